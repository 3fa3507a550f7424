"""A fuzzed command line: generated flag combinations for ``wanda`` and each sub-command, on tiny models.

Every run either succeeds (exit 0) or exits 2 with exactly one ``wanda...: error:`` line as the last line of
stderr (``wanda speedup`` without a suitable GPU: exit 3 and one line); none prints a traceback, and a run that
fails leaves its working folder exactly as it was (no file added, changed or removed, no temporary folder or
lock file); one that succeeds leaves no temporary folder or lock file either.

The entry point is called in-process (``wanda.cli.main.main(argv)``, catching ``SystemExit``), so a few
hundred examples per command take minutes, not hours. ``WANDA_FUZZ_EXAMPLES`` sets the count per command
(default 300); ``WANDA_FUZZ_REPORT=file.json`` records the counts of each outcome.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, word_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: For the examples only (set by the module's fixture): no network, no progress bars, no tracking services.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}

EXAMPLES = int(os.environ.get("WANDA_FUZZ_EXAMPLES", "300"))
REPORT = os.environ.get("WANDA_FUZZ_REPORT")

#: Values that break things: out of range, wrong type, empty, unknown names, odd text, special numbers.
HOSTILE = [
    "",
    " ",
    "0",
    "-1",
    "-7",
    "1",
    "2",
    "3",
    "64",
    "0.0",
    "0.5",
    "0.999",
    "1.0",
    "1.5",
    "-0.5",
    "1e309",
    "1e-320",
    "nan",
    "inf",
    "-inf",
    "99999999999999999999",
    "0x10",
    "1_000",
    "2:4",
    "4:8",
    "5:4",
    "0:4",
    "2:0",
    "2-4",
    "a:b",
    "unstructured",
    "abc",
    "\u2603",
    "none",
    "None",
    "true",
    "false",
    "auto",
    "cpu",
    "cuda",
    "cuda:7",
    "mps",
    "float16",
    "bfloat16",
    "float32",
    "int8",
    "wanda",
    "magnitude",
    "sparsegpt",
    "dense",
    "compressed",
    "row",
    "layer",
    "transformers",
    "timm",
    "cutlass",
    "%s",
    "{}",
    "-",
    "--",
]
#: Paths, relative to the per-example working folder (see ``_sandbox``).
PATHS = [
    "file.txt",
    "folder",
    "empty",
    "missing/deeper",
    "binary.bin",
    "file.txt/below",
    "/proc/wanda-fuzz",
    "out",
    "out/model",
    "llama",
    "corpus.txt",
    "bad.jsonl",
    "latin1.txt",
    "vision",
    "images",
    "adapter",
    "~/nonexistent-wanda",
    "/",
]
UNKNOWN_FLAGS = ["--bogus", "--Model", "--model_name", "--sparsity-ratio", "-x", "--trust-remote-code", "--"]


def _sandbox_template(root: Path) -> Path:
    """What each example's working folder starts as: tiny models, corpora, and paths of every kind."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    template = root / "template"
    template.mkdir()
    save_tiny(template, "llama").rename(template / "llama")
    word_corpus(template / "corpus.txt", words=600)
    (template / "file.txt").write_text("a few words\n")
    (template / "folder").mkdir()
    (template / "folder" / "inside.txt").write_text("inside\n")
    (template / "empty").mkdir()
    (template / "binary.bin").write_bytes(bytes(range(256)))
    (template / "bad.jsonl").write_text('{"text": "w1 w2"}\n{"text": \n')
    (template / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=4,
            num_labels=3,
        )
    )
    vit.save_pretrained(template / "vision")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(3):
            folder = template / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 255, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return template


def _make_adapter(template: Path) -> None:
    """A LoRA adapter of the tiny model, for ``finetune merge`` and ``finetune eval``."""
    code, _, err = _call(
        [
            "finetune",
            "lora",
            "--model",
            str(template / "llama"),
            "--dataset",
            str(template / "corpus.txt"),
            "--output_dir",
            str(template / "adapter"),
            *FT_QUICK,
        ]
    )
    assert code == 0, err[-3000:]


FT_QUICK = [
    "--block_size",
    "16",
    "--max_steps",
    "1",
    "--max_eval_samples",
    "1",
    "--logging_steps",
    "1",
    "--save_steps",
    "1",
    "--device",
    "cpu",
]

#: A quick valid run of each command (paths relative to the working folder); the fuzz edits these.
BASES: dict[str, dict[str, list[str]]] = {
    "wanda": {
        "": [
            "--model",
            "llama",
            "--calib_dataset",
            "corpus.txt",
            "--eval_dataset",
            "corpus.txt",
            "--seqlen",
            "16",
            "--nsamples",
            "2",
            "--eval_windows",
            "1",
            "--device",
            "cpu",
            "--batch_size",
            "2",
        ]
    },
    "eval": {
        "eval": [
            "--model",
            "llama",
            "--eval_dataset",
            "corpus.txt",
            "--seqlen",
            "16",
            "--eval_windows",
            "1",
            "--device",
            "cpu",
        ]
    },
    "finetune": {
        "finetune lora": ["--model", "llama", "--dataset", "corpus.txt", "--output_dir", "out", *FT_QUICK],
        "finetune full": ["--model", "llama", "--dataset", "corpus.txt", "--output_dir", "out", *FT_QUICK],
        "finetune merge": ["--model", "llama", "--adapter", "adapter", "--output", "out", "--device", "cpu"],
        "finetune eval": [
            "--model",
            "llama",
            "--adapter",
            "adapter",
            "--eval_dataset",
            "corpus.txt",
            "--seqlen",
            "16",
            "--eval_windows",
            "1",
            "--device",
            "cpu",
        ],
        "finetune": [],
    },
    "vision": {
        "vision": [
            "--model",
            "tiny",
            "--resume",
            "vision",
            "--data_path",
            "images",
            "--nsamples",
            "2",
            "--batch_size",
            "2",
            "--workers",
            "0",
            "--sparsity",
            "0.5",
            "--no_progress",
            "--eval_limit",
            "2",
        ]
    },
    "speedup": {"speedup": ["--model", "llama", "--device", "cpu"]},
}

_ERROR_LINE = re.compile(r"^wanda(?: [a-z]+)*: error: \S")


def _call(argv: list[str]) -> tuple[int, str, str]:
    """``wanda ARGV`` in this process: (exit code, stdout, stderr)."""
    from wanda.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv), "wanda")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _flags(command_path: str) -> list[str]:
    """The flags the live parser offers (from its --help), so the fuzz follows the command line as it is."""
    code, out, err = _call([*command_path.split(), "--help"] if command_path else ["--help"])
    assert code == 0, err
    return sorted({f for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)", out) if f != "--help"})


def _snapshot(root: Path) -> dict[str, tuple]:
    return {
        str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
        for p in root.rglob("*")
    }


_LEFTOVER = re.compile(r"(\.tmp$|\.lock$|\.old-\d+$|^\.wanda-probe-)")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    template = _sandbox_template(root)
    _make_adapter(template)
    return template


@pytest.fixture(scope="module", autouse=True)
def quick_and_offline():
    """No example may reach for the network (hub ids are tried, and must fail fast); and no example spends
    0.6 s in ``release_memory``'s full garbage collection, which a test process with torch, transformers and
    hypothesis loaded makes slow (it returns memory to the OS; it changes no result)."""
    import importlib
    import sys

    import huggingface_hub.constants

    for name in ("prune", "eval", "finetune", "vision", "speedup"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"wanda.cli.{name}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENV.items():
            patch.setenv(name, value)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when it was imported
        for module in [m for name, m in sys.modules.items() if name.startswith("wanda")]:
            if callable(getattr(module, "release_memory", None)):
                patch.setattr(module, "release_memory", lambda: None)
        yield


def _value(draw, flags: list[str]) -> str:
    kind = draw(st.sampled_from(["hostile", "hostile", "path", "number", "text"]))
    if kind == "hostile":
        return draw(st.sampled_from(HOSTILE))
    if kind == "path":
        return draw(st.sampled_from(PATHS))
    if kind == "number":
        return str(draw(st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True))))
    return draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))


@st.composite
def command_lines(draw, bases: dict[str, list[str]], flags: dict[str, list[str]]) -> list[str]:
    """One command line: a quick valid run of the command with 0-4 edits (a flag set to a hostile value or to a
    path of some kind, a flag dropped, an unknown flag, a switch or flag given without its value)."""
    path = draw(st.sampled_from(sorted(bases)))
    args = list(bases[path])
    known = flags[path] or ["--help"]
    for _ in range(draw(st.integers(0, 4))):
        edit = draw(st.sampled_from(["set", "set", "set", "drop", "unknown", "bare"]))
        if edit == "set":
            args += [draw(st.sampled_from(known)), _value(draw, known)]
        elif edit == "drop" and args:
            # --model stays: without it the bundled SmolLM2-135M loads (seconds and 1 GB, not a tiny model)
            flag_positions = [i for i, a in enumerate(args) if a.startswith("--") and a != "--model"]
            if flag_positions:
                i = draw(st.sampled_from(flag_positions))
                end = i + 1 + (i + 1 < len(args) and not args[i + 1].startswith("--"))
                del args[i:end]
        elif edit == "unknown":
            args += [draw(st.sampled_from(UNKNOWN_FLAGS))]
        elif edit == "bare":
            args += [draw(st.sampled_from(known))]
    return [*path.split(), *args]


@pytest.mark.parametrize("command", list(BASES))
def test_fuzzed_command_line(command, template, tmp_path):
    bases = BASES[command]
    flags = {path: _flags(path) for path in bases}
    outcomes: Counter = Counter()
    seen_errors: Counter = Counter()
    slowest: list[tuple[float, str]] = []
    start = time.perf_counter()
    home = os.getcwd()

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(argv=command_lines(bases, flags))
    def run(argv: list[str]) -> None:
        work = tmp_path / f"ex{sum(outcomes.values())}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work, symlinks=True)
        before = _snapshot(work)
        os.chdir(work)
        began = time.perf_counter()
        try:
            code, _, err = _call(argv)
        finally:
            os.chdir(home)
        slowest.append((time.perf_counter() - began, " ".join(argv)))
        after = _snapshot(work)
        shown = f"wanda {' '.join(argv)}\n--- stderr ---\n{err[-4000:]}"
        assert "Traceback" not in err, shown
        leftovers = [p for p in after if _LEFTOVER.search(Path(p).name)]
        assert leftovers == [], f"left {leftovers}: {shown}"
        lines = [line for line in err.split("\n") if line.strip()]  # not splitlines(): \x1e is no line break
        if code == 0:
            outcomes["succeeded"] += 1
        elif code == 3 and command == "speedup":
            errors = [line for line in lines if _ERROR_LINE.match(line)]
            assert len(errors) == 1 and errors[0] == lines[-1] and "CUDA GPU" in errors[0], shown
            outcomes["exit 3 (no GPU)"] += 1
        else:
            assert code == 2, f"exit {code}: {shown}"
            errors = [line for line in lines if _ERROR_LINE.match(line)]
            assert len(errors) == 1 and errors[0] == lines[-1], shown
            seen_errors[re.sub(r"[\d/].*", "", errors[0].split("error: ", 1)[1])[:40]] += 1
            outcomes["exit 2"] += 1
        if code != 0:
            changed = sorted(set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]})
            assert changed == [], f"a failed run changed {changed[:5]}: {shown}"
        shutil.rmtree(work, ignore_errors=True)

    run()
    total = sum(outcomes.values())
    seconds = time.perf_counter() - start
    print(
        f"\n{command}: {total} examples in {seconds:.0f} s: {dict(outcomes)}; "
        f"{len(seen_errors)} distinct error messages; slowest: {sorted(slowest)[-3:]}"
    )
    if REPORT:
        report = json.loads(Path(REPORT).read_text()) if Path(REPORT).is_file() else {}
        report[command] = {
            "examples": total,
            "seconds": round(seconds, 1),
            **outcomes,
            "distinct_errors": len(seen_errors),
        }
        Path(REPORT).write_text(json.dumps(report, indent=2) + "\n")
    assert total >= EXAMPLES
    assert outcomes["succeeded"] > 0 or command == "speedup"  # the fuzz also reaches runs that work
