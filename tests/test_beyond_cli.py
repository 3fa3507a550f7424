"""The new flags as a user runs them: ``wanda`` subprocesses on the tiny saved models with every new setting and
combination (exact per-layer counts from results_*.json), and bad combinations (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny, word_corpus

from wanda.masks import prune_count

BIN = Path(sys.executable).parent
TIMEOUT = 600


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("beyond-cli-inputs")
    return {
        "llama": save_tiny(root, "llama"),
        "opt": save_tiny(root, "opt"),
        "corpus": word_corpus(root / "corpus.txt", words=2000),
    }


def _args(files, model: str, extra: list[str]) -> list[str]:
    return [
        "--model",
        str(files[model]),
        "--calib_dataset",
        str(files["corpus"]),
        "--eval_dataset",
        str(files["corpus"]),
        "--seqlen",
        "32",
        "--nsamples",
        "8",
        "--eval_windows",
        "2",
        "--device",
        "cpu",
        "--save",
        "out",
    ] + extra


def _run_all(cases: dict[str, tuple[str, list[str]]], files, env, tmp_path_factory) -> dict:
    """Start every case at once (each is mostly interpreter start-up), then wait for all."""
    started = {}
    for case, (model, extra) in cases.items():
        cwd = tmp_path_factory.mktemp(re.sub(r"\W", "_", case))
        started[case] = (
            subprocess.Popen(
                [str(BIN / "wanda")] + _args(files, model, extra),
                env=env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
            cwd,
        )
    done = {}
    for case, (proc, cwd) in started.items():
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        done[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), cwd)
    return done


GOOD = {
    "ria": ("llama", ["--prune_method", "ria", "--sparsity_ratio", "0.6"]),
    "ria_2:4_dsnot": ("llama", ["--prune_method", "ria", "--sparsity_type", "2:4", "--dsnot"]),
    "wanda_dsnot_4:8_all_layers": (
        "opt",
        [
            "--prune_method",
            "wanda",
            "--sparsity_type",
            "4:8",
            "--dsnot",
            "--dsnot_skip",
            "none",
            "--dsnot_max_cycles",
            "10",
        ],
    ),
    "magnitude_dsnot": (
        "llama",
        [
            "--prune_method",
            "magnitude",
            "--dsnot",
            "--dsnot_same_sign",
            "--dsnot_threshold",
            "0.01",
            "--dsnot_var_power",
            "0.5",
        ],
    ),
    "sparsegpt_dsnot": ("llama", ["--prune_method", "sparsegpt", "--dsnot", "--dsnot_skip", "self_attn"]),
    "owl_wanda": ("llama", ["--prune_method", "wanda", "--sparsity_profile", "owl", "--sparsity_ratio", "0.7"]),
    "owl_wanda_opt": (
        "opt",
        [
            "--prune_method",
            "wanda",
            "--sparsity_profile",
            "owl",
            "--sparsity_ratio",
            "0.6",
            "--owl_m",
            "3",
            "--owl_lambda",
            "0.05",
        ],
    ),
    "owl_sparsegpt": ("llama", ["--prune_method", "sparsegpt", "--sparsity_profile", "owl", "--sparsity_ratio", "0.7"]),
    "owl_magnitude": ("opt", ["--prune_method", "magnitude", "--sparsity_profile", "owl", "--sparsity_ratio", "0.6"]),
    "owl_ria_dsnot": (
        "llama",
        ["--prune_method", "ria", "--sparsity_profile", "owl", "--dsnot", "--ria_a", "1.0", "--sparsity_ratio", "0.7"],
    ),
}


@pytest.fixture(scope="module")
def good_runs(files, env, tmp_path_factory):
    return _run_all(GOOD, files, env, tmp_path_factory)


@pytest.mark.parametrize("case", list(GOOD))
def test_new_flags_run_with_exact_per_layer_counts(case, good_runs):
    proc, cwd = good_runs[case]
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, extra = GOOD[case]
    method = extra[extra.index("--prune_method") + 1]
    results = json.loads((cwd / "out" / f"results_{method}.json").read_text())
    prune = results["prune"]
    settings = prune["settings"]
    flags = dict(zip(extra, extra[1:] + [""]))
    assert settings["sparsity_profile"] == flags.get("--sparsity_profile", "uniform")
    assert settings["dsnot"] == ("--dsnot" in extra)
    for flag in ("--owl_m", "--owl_lambda", "--ria_a", "--dsnot_threshold", "--dsnot_var_power"):
        if flag in flags:
            assert settings[flag[2:]] == float(flags[flag])
    layers = prune["layers"]
    assert len(layers) == 14 if model == "llama" else 12
    target = settings["sparsity_ratio"]
    zeros = total = 0
    for layer in layers:
        rows, cols = layer["shape"]
        count = round(layer["sparsity"] * rows * cols)
        if ":" in settings["sparsity_type"]:
            n, m = map(int, settings["sparsity_type"].split(":"))
            assert count == rows * cols * n // m
        else:
            assert count == prune_count(layer["ratio"], rows * cols), layer["name"]
        zeros += count
        total += rows * cols
    assert abs(zeros - target * total) <= len(layers)  # the model: within one weight per layer
    ratios = {layer["ratio"] for layer in layers}
    if settings["sparsity_profile"] == "owl":
        assert len(ratios) == 2 and max(ratios) - min(ratios) == pytest.approx(2 * settings["owl_lambda"], rel=1e-9)
    else:
        assert ratios == {target}


BAD = {
    "owl_with_nm": (
        "llama",
        ["--sparsity_profile", "owl", "--sparsity_type", "2:4"],
        r"--sparsity_profile owl is defined for unstructured sparsity only",
    ),
    "owl_lambda_too_big": ("llama", ["--sparsity_profile", "owl", "--sparsity_ratio", "0.95"], r"--owl_lambda"),
    "unknown_profile": ("llama", ["--sparsity_profile", "layerwise"], r"--sparsity_profile.*invalid choice"),
    "dsnot_after_an_ablation": (
        "llama",
        ["--prune_method", "ablate_wanda_seq", "--dsnot"],
        r"--dsnot follows --prune_method magnitude, wanda, ria, sparsegpt",
    ),
    "dsnot_after_the_variant": ("llama", ["--use_variant", "--dsnot"], r"--dsnot follows.*--use_variant"),
    "dsnot_no_cycles": ("llama", ["--dsnot", "--dsnot_max_cycles", "0"], r"--dsnot_max_cycles must be at least 1"),
}


@pytest.fixture(scope="module")
def bad_runs(files, env, tmp_path_factory):
    return _run_all({case: (model, extra) for case, (model, extra, _) in BAD.items()}, files, env, tmp_path_factory)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_combinations_exit_2_with_one_line(case, bad_runs):
    proc, cwd = bad_runs[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("wanda: error: ")
    assert sum("error:" in line for line in lines) == 1, proc.stderr[-3000:]
    assert re.search(BAD[case][2], lines[-1]), lines[-1]
    assert not (cwd / "out").exists(), "a failed run wrote files"
