"""The same run twice gives bit-identical weights and the same perplexities (same machine, same process)."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny, word_corpus

from wanda import PruneSettings, perplexity, prune
from wanda.data import calibration_windows, evaluation_windows, resolve_source
from wanda.methods import PRUNERS
from wanda.models import load_model
from wanda.models.compressed import same_bits


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    return save_tiny(root, "llama"), word_corpus(root / "corpus.txt", words=3000)


def _run(inputs, method: str, sparsity_type: str) -> tuple[dict[str, torch.Tensor], float]:
    """The pruning job end to end, from the files on disk: load, sample, prune, evaluate."""
    folder, corpus = inputs
    loaded = load_model(str(folder), device="cpu")
    calib = calibration_windows(resolve_source(str(corpus), "calibration"), loaded.tokenizer, 8, 32, seed=3)
    prune(
        loaded.model,
        calib,
        PruneSettings(prune_method=method, sparsity_type=sparsity_type),
        progress=False,
        batch_size=3,
    )  # 3 does not divide 8: a ragged last batch too
    test = evaluation_windows(resolve_source(str(corpus), "evaluation"), loaded.tokenizer, 32, max_windows=4)
    return loaded.model.state_dict(), perplexity(loaded.model, test, batch_size=2, progress=False)


#: every method unstructured, and the N:M code paths of the two that choose masks differently
CASES = [(method, "unstructured") for method in PRUNERS] + [("wanda", "2:4"), ("sparsegpt", "2:4")]


@pytest.mark.parametrize("method, sparsity_type", CASES)
def test_same_run_twice_is_bit_identical(inputs, method, sparsity_type):
    first_state, first_ppl = _run(inputs, method, sparsity_type)
    second_state, second_ppl = _run(inputs, method, sparsity_type)
    assert set(first_state) == set(second_state)
    changed = [k for k in first_state if not same_bits(first_state[k], second_state[k])]
    assert changed == []
    assert first_ppl == second_ppl  # exactly: the same float, not approximately
    zeros = sum(int((v == 0).sum()) for k, v in first_state.items() if "layers" in k and k.endswith("proj.weight"))
    assert zeros > 0  # it did prune


def test_same_command_twice_writes_identical_files(inputs, tmp_path):
    """Through the command line: the saved weights are byte for byte the same, and so are the perplexities."""
    import contextlib
    import io
    import json

    from wanda.cli.main import main

    folder, corpus = inputs
    for run in ("a", "b"):
        argv = [
            "--model",
            str(folder),
            "--prune_method",
            "sparsegpt",
            "--calib_dataset",
            str(corpus),
            "--eval_dataset",
            str(corpus),
            "--seqlen",
            "32",
            "--nsamples",
            "8",
            "--eval_windows",
            "4",
            "--device",
            "cpu",
            "--save",
            str(tmp_path / run),
            "--save_model",
            str(tmp_path / run / "model"),
        ]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with pytest.raises(SystemExit) as exited:
                main(argv, "wanda")
        assert exited.value.code == 0
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    results = [json.loads((tmp_path / run / "results_sparsegpt.json").read_text()) for run in ("a", "b")]
    assert results[0]["perplexity"] == results[1]["perplexity"]
    assert (tmp_path / "a" / "log_sparsegpt.txt").read_text() == (tmp_path / "b" / "log_sparsegpt.txt").read_text()
