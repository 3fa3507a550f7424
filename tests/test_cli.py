"""The command line as a user runs it: subprocesses of every entry point on a tiny saved model and a word corpus."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, word_corpus

from wanda import METHODS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORIGINAL_FLAGS = [
    "--model",
    "--cache_dir",
    "--seed",
    "--nsamples",
    "--sparsity_ratio",
    "--sparsity_type",
    "--prune_method",
    "--use_variant",
    "--save",
    "--save_model",
    "--eval_zero_shot",
]
TIMEOUT = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-inputs")
    return {
        "llama": save_tiny(root, "llama"),
        "opt": save_tiny(root, "opt"),
        "corpus": word_corpus(root / "corpus.txt", words=2000),
        "short": word_corpus(root / "short.txt", words=100),  # 8 windows of 32 tokens need 256
    }


def _args(files, model: str = "llama", **overrides) -> list[str]:
    flags = {
        "--model": str(files[model]),
        "--calib_dataset": str(files["corpus"]),
        "--eval_dataset": str(files["corpus"]),
        "--seqlen": "32",
        "--nsamples": "8",
        "--eval_windows": "2",
        "--device": "cpu",
    }
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (key, value)]


def _command(entry: str) -> list[str]:
    return {
        "module": [sys.executable, "-m", "wanda.main"],
        "main.py": [sys.executable, str(REPO / "main.py")],
        "wanda": [str(BIN / "wanda")],
        "wanda-opt": [str(BIN / "wanda-opt")],
    }[entry]


def _run(entry: str, args: list[str], env, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(entry) + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": b"" for p in root.rglob("*") if p.is_dir()
    }


def _log_row(save: Path, method: str) -> dict[str, str]:
    header, row, *rest = (save / f"log_{method}.txt").read_text().splitlines()
    assert rest == []
    columns = header.split("\t")
    assert columns[:3] == ["method", "actual_sparsity", "ppl_test"]
    return dict(zip(columns, row.split("\t")))


# runs that succeed --------------------------------------------------------------------------------------------


def test_wanda_run_writes_results_and_a_reloadable_model(files, env, tmp_path):
    proc = _run(
        "module",
        _args(files)
        + [
            "--prune_method",
            "wanda",
            "--sparsity_ratio",
            "0.5",
            "--sparsity_type",
            "unstructured",
            "--save",
            "out/",
            "--save_model",
            "pruned",
        ],
        env,
        tmp_path,
    )
    _ok(proc)
    row = _log_row(tmp_path / "out", "wanda")
    assert row["method"] == "wanda" and row["actual_sparsity"] == "0.5000"
    assert math.isfinite(float(row["ppl_test"])) and float(row["ppl_test"]) > 1
    results = json.loads((tmp_path / "out" / "results_wanda.json").read_text())
    assert results["prune"]["actual_sparsity"] == 0.5
    assert results["prune"]["settings"]["method"] == "wanda"
    assert list(results["perplexity"]["pruned"].values()) == [pytest.approx(float(row["ppl_test"]), rel=1e-3)]
    assert "wanda" in proc.stdout and "0.5000" in proc.stdout
    _check_saved_model(files, tmp_path / "pruned")


def _check_saved_model(files, folder: Path) -> None:
    """The saved folder reloads with exactly the zeros that pruning the same model in this process gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wanda import PruneSettings, prune
    from wanda.data import calibration_windows, resolve_source
    from wanda.models import find_decoder_layout, find_linears

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder) is not None
    expected = AutoModelForCausalLM.from_pretrained(files["llama"])
    original = AutoModelForCausalLM.from_pretrained(files["llama"]).state_dict()
    tokenizer = AutoTokenizer.from_pretrained(files["llama"])
    calib = calibration_windows(resolve_source(str(files["corpus"]), "calibration"), tokenizer, 8, 32, 0)
    prune(expected, calib, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False)

    layout = find_decoder_layout(reloaded)
    pruned = {
        f"{name}.weight" for i, block in enumerate(layout.blocks) for name in find_linears(block, layout.block_name(i))
    }
    assert len(pruned) == 14
    got, want = reloaded.state_dict(), expected.state_dict()
    for key, value in got.items():
        if key in pruned:
            zeros = value == 0
            assert torch.equal(zeros, want[key] == 0), f"{key}: zeros differ"
            assert zeros.sum(1).eq(value.shape[1] // 2).all(), key
            assert torch.equal(value[~zeros], original[key][~zeros]), key
        else:
            assert torch.equal(value, original[key]), f"{key} changed"


def test_opt_via_wanda_opt(files, env, tmp_path):
    _ok(_run("wanda-opt", _args(files, "opt") + ["--prune_method", "wanda", "--save", "out"], env, tmp_path))
    row = _log_row(tmp_path / "out", "wanda")
    assert row["actual_sparsity"] == "0.5000" and math.isfinite(float(row["ppl_test"]))
    assert (tmp_path / "out" / "results_wanda.json").is_file()


def test_main_py_from_the_repository_root_with_overwrite(files, env, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "log_magnitude.txt").write_text("an earlier result\n")
    _ok(
        _run(
            "main.py",
            _args(files)
            + ["--prune_method", "magnitude", "--sparsity_type", "2:4", "--save", str(save), "--overwrite"],
            env,
            REPO,
        )
    )
    row = _log_row(save, "magnitude")
    assert row["method"] == "magnitude" and row["actual_sparsity"] == "0.5000"
    assert json.loads((save / "results_magnitude.json").read_text())["prune"]["settings"]["pattern"] == "2:4"
    assert sorted(p.name for p in save.iterdir()) == ["log_magnitude.txt", "results_magnitude.json"]


def test_help_mentions_every_original_flag(env, tmp_path):
    proc = _run("wanda", ["--help"], env, tmp_path)
    _ok(proc)
    for flag in ORIGINAL_FLAGS:
        assert flag in proc.stdout, flag
    for method in METHODS:
        assert method in proc.stdout, method
    assert list(tmp_path.iterdir()) == []


# bad inputs: exit code 2, one plain line, nothing written ------------------------------------------------------

#: case -> (flags replacing or adding to the working command, pattern the error line must match)
BAD = {
    "nm_n_not_below_m": ({"--sparsity_type": "5:4"}, r"0 < N < M"),
    "ratio_above_one": ({"--sparsity_ratio": "1.5"}, r"--sparsity_ratio must be in \[0, 1\), got 1\.5"),
    "nm_with_other_ratio": ({"--sparsity_type": "2:4", "--sparsity_ratio": "0.6"}, r"2:4 prunes exactly 0\.5.*0\.6"),
    "no_samples": ({"--nsamples": "0"}, r"--nsamples must be at least 1"),
    "missing_model": ({"--model": "/nonexistent/tiny-model"}, r"/nonexistent/tiny-model does not exist"),
    "unknown_method": ({"--prune_method": "search"}, r"--prune_method.*invalid choice: 'search'.*ablate_wanda_iter"),
    "variant_with_sparsegpt": ({"--prune_method": "sparsegpt", "--use_variant": None}, r"--use_variant"),
    "seqlen_too_short": ({"--seqlen": "1"}, r"--seqlen must be at least 2, got 1"),
    "nm_not_parsable": ({"--sparsity_type": "2-4"}, r"'unstructured' or N:M"),
    "existing_results": ({}, r"log_wanda\.txt already exists.*--overwrite"),
    "short_corpus": ({"--calib_dataset": "short"}, r"has 100 tokens.*8 windows of 32 tokens need 256"),
    "unknown_flag": ({"--bogus": None}, r"unrecognized arguments: --bogus"),
    "sink_weight_zero": ({"--sink_weight": "0"}, r"--sink_weight must be a finite number above 0, got 0"),
}


@pytest.fixture(scope="module")
def bad_runs(files, env, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict]]:
    """All bad commands at once (each is mostly interpreter start-up): case -> (process, tree before, after)."""
    started = {}
    for case, (flags, _) in BAD.items():
        cwd = tmp_path_factory.mktemp(case)
        if case == "existing_results":
            (cwd / "out").mkdir()
            (cwd / "out" / "log_wanda.txt").write_text("earlier result\n")
        overrides = {k: (str(files[v]) if v in files else v) for k, v in flags.items() if v is not None}
        switches = [k for k, v in flags.items() if v is None]
        args = _args(files, **overrides) + switches + ["--save", "out", "--save_model", "model"]
        before = _tree(cwd)
        started[case] = (
            subprocess.Popen(
                _command("wanda") + args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
            cwd,
            before,
        )
    done = {}
    for case, (proc, cwd, before) in started.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        done[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), before, _tree(cwd))
    return done


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, bad_runs):
    proc, before, after = bad_runs[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    assert errors[0].startswith("wanda: error: ")
    assert re.search(BAD[case][1], errors[0]), errors[0]
    assert after == before, "a failed run wrote files"


def test_calibration_and_evaluation_text_piped_into_the_standard_input(files, env, tmp_path):
    """``--calib_dataset -`` and ``--eval_dataset /dev/stdin`` read one pipe: the same model and perplexity as
    the same text given as a file."""
    common = ["--prune_method", "wanda", "--save_model", "model", "--save", "out"]
    by_file = tmp_path / "file"
    by_file.mkdir()
    _ok(_run("wanda", _args(files) + common, env, by_file))
    piped = tmp_path / "pipe"
    piped.mkdir()
    args = _args(files, **{"--calib_dataset": "-", "--eval_dataset": "/dev/stdin"}) + common
    proc = subprocess.run(
        _command("wanda") + args,
        env=env,
        cwd=piped,
        input=files["corpus"].read_text("utf-8"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    _ok(proc)
    from safetensors.torch import load_file

    want, got = load_file(by_file / "model" / "model.safetensors"), load_file(piped / "model" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ppl = [re.findall(r"ppl[^0-9]*([0-9.]+)", (d / "out" / "log_wanda.txt").read_text()) for d in (by_file, piped)]
    assert ppl[0] and ppl[0] == ppl[1]
