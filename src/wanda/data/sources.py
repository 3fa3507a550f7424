"""Where text comes from: named hub datasets, local files and folders, and the offline summaries.

A source resolves to a ``TextSource``: a list of documents plus how windows are drawn from it. Named hub
sources keep the papers' protocols (C4 calibration: a window from each of random long documents).
Local copies in standard layouts are used instead of the hub when ``$WANDA_DATA_DIR`` holds them
(``wikitext-2-raw/wiki.{train,valid,test}.raw``, ``c4/*.jsonl``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from ..errors import WandaError
from ..utils.hub import hub_problem
from .summaries import summaries_split

log = logging.getLogger(__name__)

Purpose = Literal["calibration", "evaluation"]
_LOCAL_SUFFIXES = (".txt", ".raw", ".json", ".jsonl", ".parquet")


@dataclass
class TextSource:
    name: str
    documents: list[str]
    #: "documents": calibration windows come from random documents longer than the window (C4's protocol);
    #: "stream": from the documents joined into one token stream (WikiText-2's protocol).
    sampling: Literal["documents", "stream"] = "stream"
    #: Joiner used when documents are concatenated into a stream.
    separator: str = "\n\n"
    #: Evaluation uses at most this many windows (SparseGPT's C4 protocol: 256).
    max_eval_windows: int | None = None


def _data_dir() -> Path | None:
    value = os.environ.get("WANDA_DATA_DIR")
    return Path(value) if value else None


def _read_text(path: Path) -> str:
    """The file's text, refused when it is empty, binary or not UTF-8 (naming the line of the first bad byte)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WandaError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    return _decode_text(data, str(path))


def _decode_text(data: bytes, name: str) -> str:
    if not data.strip():
        raise WandaError(f"{name} is empty; give a file with text in it")
    if b"\0" in data[:65536]:
        raise WandaError(f"{name} is not a text file (it holds NUL bytes, as binary files do)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise WandaError(
            f"{name} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} (convert it with iconv -t utf-8)"
        ) from exc


#: Source names that read the standard input, as one plain-text document (the only stream accepted: a named
#: pipe or a device given as a path is refused, since opening it can block for ever).
STDIN_NAMES = ("-", "/dev/stdin")


@functools.cache
def _stdin_text() -> str:
    """The standard input's text, read once: calibration and evaluation may both name it."""
    stream = sys.stdin
    if stream is None or stream.closed:
        raise WandaError("the standard input is closed; pipe the text into it (--calib_dataset - < calib.txt)")
    if stream.isatty():
        raise WandaError("the standard input is a terminal; pipe the text into it (--calib_dataset - < calib.txt)")
    return _decode_text(stream.buffer.read(), "the standard input")


def _read_json_texts(path: Path, field: str) -> list[str]:
    text = _read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise WandaError(f"{path} line {number} is not JSON ({exc.msg}, column {exc.colno})") from exc
        where = "line"
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WandaError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
        items = data if isinstance(data, list) else list(data.values()) if isinstance(data, dict) else [data]
        records = list(enumerate(items))
        where = "record"
    texts = []
    for number, record in records:
        if not isinstance(record, dict) or field not in record:
            raise WandaError(f"{path}: {where} {number} has no field {field!r}; name the text field with --text_field")
        if not isinstance(record[field], str):  # a number, list or null made into text would calibrate on "None"
            kind = type(record[field]).__name__ if record[field] is not None else "null"
            raise WandaError(f"{path}: {where} {number} field {field!r} is {kind}, not text")
        texts.append(record[field])
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    if path.suffix in (".txt", ".raw"):
        return [_read_text(path)]
    if path.suffix in (".json", ".jsonl"):
        return _read_json_texts(path, field)
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as exc:
            raise WandaError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0][:200]})") from exc
        if field not in table.column_names:
            raise WandaError(
                f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); use --text_field"
            )
        return [str(t) for t in table.column(field).to_pylist()]
    raise WandaError(f"{path}: unsupported file type; use one of {', '.join(_LOCAL_SUFFIXES)} or a folder of them")


def _local_source(path: Path, field: str) -> TextSource:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _LOCAL_SUFFIXES)
        if not files:
            raise WandaError(f"folder {path} holds no {', '.join(_LOCAL_SUFFIXES)} files")
        documents = [doc for f in files for doc in _read_file(f, field)]
    else:
        documents = _read_file(path, field)
    if not any(doc.strip() for doc in documents):
        raise WandaError(f"{path} holds no text (every record is empty)")
    return TextSource(path.name, documents)


def _hub(purpose: Purpose, *args, **kwargs):
    from datasets import load_dataset

    problem = hub_problem()
    if problem is not None:  # one quick check instead of the datasets library's retry loop
        raise WandaError(
            f"{args[0]} is not available offline and the hub cannot be reached ({problem}); use a local "
            "copy (WANDA_DATA_DIR, or --calib_dataset/--eval_dataset PATH) or wiki-summaries"
        )
    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types for offline/missing data
        raise WandaError(
            f"could not load {args[0]} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "offline, use a local file (--calib_dataset/--eval_dataset PATH) or wiki-summaries"
        ) from exc


def wikitext_rows(raw: str) -> list[str]:
    """The hub's rows from a raw file: each line with its newline, blank lines as empty strings."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _wikitext2(purpose: Purpose) -> TextSource:
    split = "train" if purpose == "calibration" else "test"
    # SparseGPT's and Wanda's protocol: training rows joined by spaces, test rows by blank lines
    separator = " " if purpose == "calibration" else "\n\n"
    data_dir = _data_dir()
    local = data_dir / "wikitext-2-raw" / f"wiki.{split}.raw" if data_dir else None
    if local is not None and local.is_file():
        return TextSource("wikitext2", wikitext_rows(local.read_text("utf-8")), separator=separator)
    rows = _hub(purpose, "wikitext", "wikitext-2-raw-v1", split=split)
    return TextSource("wikitext2", list(rows["text"]), separator=separator)


def _ptb(purpose: Purpose) -> TextSource:
    split = "train" if purpose == "calibration" else "test"
    rows = _hub(purpose, "ptb_text_only", "penn_treebank", split=split)
    return TextSource("ptb", [" ".join(rows["sentence"])])


def _c4(purpose: Purpose) -> TextSource:
    data_dir = _data_dir()
    if purpose == "evaluation":
        local = sorted((data_dir / "c4").glob("*.jsonl")) if data_dir and (data_dir / "c4").is_dir() else []
        if local:
            docs = [d for f in local for d in _read_json_texts(f, "text")]
        else:
            rows = _hub(
                purpose,
                "allenai/c4",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            )
            docs = rows["text"]
        # SparseGPT's protocol: the first 1100 validation documents joined by spaces
        return TextSource("c4", list(docs[:1100]), sampling="stream", separator=" ", max_eval_windows=256)
    rows = _hub(purpose, "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    return TextSource("c4", list(rows["text"]), sampling="documents")


def _summaries(purpose: Purpose) -> TextSource:
    return TextSource("wiki-summaries", list(summaries_split(purpose)))


#: The named sources: the one registry their names come from (``--calib_dataset``, ``--eval_dataset``, help).
SOURCES: dict[str, Callable[[Purpose], TextSource]] = {
    "c4": _c4,
    "wikitext2": _wikitext2,
    "ptb": _ptb,
    "wiki-summaries": _summaries,
}
NAMED_SOURCES = tuple(SOURCES)


def resolve_source(spec: str, purpose: Purpose, text_field: str = "text") -> TextSource:
    """``spec``: a name from ``NAMED_SOURCES``, a ``datasets`` folder saved with ``save_to_disk``, or a path."""
    if spec in SOURCES:
        return SOURCES[spec](purpose)
    if not spec.strip():
        raise WandaError(f"an empty data source name; give one of {', '.join(NAMED_SOURCES)} or a path")
    if spec in STDIN_NAMES:
        return TextSource("stdin", [_stdin_text()])
    path = Path(spec).expanduser()
    if not path.exists():
        raise WandaError(f"data source {spec!r} is neither a file/folder nor one of {', '.join(NAMED_SOURCES)}")
    if not (path.is_dir() or path.is_file()):  # a named pipe or a device: reading it could block for ever
        raise WandaError(f"data source {spec} is not a regular file or folder (a pipe or a device); give a file")
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _saved_dataset(path, purpose, text_field)
    return _local_source(path, text_field)


def _saved_dataset(path: Path, purpose: Purpose, field: str) -> TextSource:
    """A folder written by ``datasets.Dataset(Dict).save_to_disk``: train split for calibration, test for eval."""
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        wanted = ("train",) if purpose == "calibration" else ("test", "validation")
        split = next((s for s in wanted if s in data), next(iter(data)))
        data = data[split]
    if field not in data.column_names:
        raise WandaError(f"{path}: no column {field!r} (columns: {', '.join(data.column_names)}); use --text_field")
    return TextSource(str(path), [str(t) for t in data[field]])


def load_documents(spec: str, purpose: Purpose, text_field: str = "text") -> list[str]:
    return resolve_source(spec, purpose, text_field).documents
