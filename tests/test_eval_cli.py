"""``wanda eval`` (a saved model: perplexity and/or zero-shot, no pruning) and ``wanda --eval_zero_shot``,
run in-process on a tiny saved model and a word corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, save_tiny, word_corpus

from wanda.cli.main import main
from wanda.data import evaluation_windows, resolve_source
from wanda.eval import perplexity
from wanda.pruning.prune import prune
from wanda.pruning.prune_settings import PruneSettings

ZEROSHOT = SHARED_DATA / "zeroshot"
needs_shared = pytest.mark.skipif(not ZEROSHOT.is_dir(), reason=f"local task files not found at {ZEROSHOT}")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("eval-inputs")
    dense = save_tiny(root / "dense")
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_ratio=0.5), progress=False)
    pruned = root / "pruned"
    model.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(dense).save_pretrained(pruned)
    return {"dense": dense, "pruned": pruned, "corpus": word_corpus(root / "corpus.txt", words=2000)}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv, "wanda")
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_perplexity_of_a_saved_model(files, tmp_path, capsys):
    save = tmp_path / "out"
    code, out, err = _run(
        [
            "eval",
            "--model",
            str(files["pruned"]),
            "--eval_dataset",
            str(files["corpus"]),
            "--seqlen",
            "32",
            "--eval_windows",
            "4",
            "--device",
            "cpu",
            "--save",
            str(save),
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((save / "results_eval.json").read_text())
    assert result["zero_shot"] is None and result["linear_sparsity"] == pytest.approx(0.5, abs=0.01)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["pruned"], dtype=torch.float32)
    windows = evaluation_windows(
        resolve_source(str(files["corpus"]), "evaluation"), AutoTokenizer.from_pretrained(files["pruned"]), 32, 4
    )
    expected = perplexity(model, windows, batch_size=8, progress=False)
    assert math.isfinite(expected) and result["perplexity"]["corpus.txt"] == pytest.approx(expected, rel=1e-6)
    assert "| corpus.txt |" in out and "sparsity 0.5" in out


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_two_sets_with_one_file_name_give_two_rows(files, tmp_path, capsys, offload):
    """Two corpora both named corpus.txt: each keeps its own row, and each row is that corpus's perplexity."""
    (tmp_path / "b").mkdir()
    other = word_corpus(tmp_path / "b" / "corpus.txt", words=1500, seed=7)
    argv = ["eval", "--model", str(files["pruned"]), "--seqlen", "32", "--eval_windows", "2", "--device", "cpu"]
    argv += ["--offload", offload, "--save", str(tmp_path / "out"), "--eval_dataset", str(files["corpus"]), str(other)]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    ppl = json.loads((tmp_path / "out" / "results_eval.json").read_text())["perplexity"]
    assert list(ppl) == ["corpus.txt", str(other)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(files["pruned"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(files["pruned"])
    for label, path in zip(ppl, [files["corpus"], other]):
        windows = evaluation_windows(resolve_source(str(path), "evaluation"), tokenizer, 32, 2)
        assert ppl[label] == pytest.approx(perplexity(model, windows, batch_size=8, progress=False), rel=1e-5)
    assert ppl["corpus.txt"] != ppl[str(other)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--eval_dataset", "none"], "nothing to evaluate"),
        (["--tasks", "rte"], "add --eval_zero_shot"),
        (["--eval_zero_shot", "--limit", "0"], "--limit must be at least 1"),
        (["--eval_zero_shot", "--eval_batch_size", "many"], "--eval_batch_size"),
        (["--eval_zero_shot", "--zero_shot_data", "/nonexistent/zeroshot"], "is not a folder"),
    ],
)
def test_bad_flags_are_one_line_errors(files, argv, message, capsys):
    code, _, err = _run(["eval", "--model", str(files["dense"]), *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_existing_results_are_not_replaced(files, tmp_path, capsys):
    (tmp_path / "results_eval.json").write_text("{}")
    code, _, err = _run(
        ["eval", "--model", str(files["dense"]), "--eval_dataset", str(files["corpus"]), "--save", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "--overwrite" in err


@needs_shared
def test_zero_shot_of_a_saved_pruned_model(files, tmp_path, capsys):
    save = tmp_path / "out"
    code, out, err = _run(
        [
            "eval",
            "--model",
            str(files["pruned"]),
            "--eval_dataset",
            "none",
            "--eval_zero_shot",
            "--tasks",
            "rte,arc_easy",
            "--limit",
            "2",
            "--zero_shot_data",
            str(ZEROSHOT),
            "--device",
            "cpu",
            "--save",
            str(save),
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((save / "results_eval.json").read_text())
    zero_shot = result["zero_shot"]
    assert result["perplexity"] == {} and set(zero_shot["metrics"]) == {"rte", "arc_easy"}
    assert all(s["evaluated"] == 2 for s in zero_shot["samples"].values())
    assert zero_shot["zero_fraction_after"] == zero_shot["zero_fraction_before"] == pytest.approx(0.5, abs=0.01)
    assert json.loads((save / "zero_shot.json").read_text())["metrics"] == zero_shot["metrics"]
    assert "| rte | acc |" in out


@needs_shared
def test_prune_job_evaluates_the_pruned_model_zero_shot(files, tmp_path, capsys):
    save = tmp_path / "out"
    code, out, err = _run(
        [
            "--model",
            str(files["dense"]),
            "--prune_method",
            "magnitude",
            "--device",
            "cpu",
            "--eval_dataset",
            str(files["corpus"]),
            "--seqlen",
            "32",
            "--eval_windows",
            "2",
            "--eval_zero_shot",
            "--tasks",
            "boolq,winogrande",
            "--limit",
            "2",
            "--zero_shot_data",
            str(ZEROSHOT),
            "--save",
            str(save),
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads((save / "results_magnitude.json").read_text())
    zero_shot = result["zero_shot"]
    assert set(zero_shot["metrics"]) == {"boolq", "winogrande"}
    assert all(s["evaluated"] == 2 for s in zero_shot["samples"].values())
    # evaluated after pruning, and the zeros survived it
    assert zero_shot["zero_fraction_after"] == zero_shot["zero_fraction_before"]
    assert zero_shot["zero_fraction_after"] == pytest.approx(result["prune"]["actual_sparsity"], abs=1e-6)
    assert (save / "zero_shot.json").is_file() and "| winogrande | acc |" in out
