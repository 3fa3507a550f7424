"""Every pair of feature values in at least one run: the all-pairs cover of the pruning job's combinations.

The factors are the method (``none`` among them: quantization alone), the pattern, the sparsity profile, DSnoT,
the offload (in memory or streamed from disk), the save format, the number of ranks, the model family (a dense
LLaMA, OPT and a Mixtral mixture of experts) and 4-bit quantization (``--wbits 4``: inside SparseGPT's loop,
after the other methods). ``allpairspy`` draws the cover over the valid combinations, so every pair that a valid run can hold is
held by a valid run; each pair only an invalid run can hold (OWL with N:M, DSnoT after a method it does not
follow, ``none`` without quantization) is one refused run. Each valid run goes through the command line and must:

- prune every matrix it reports to its exact sparsity (N of every M, or the layer's ratio to within one weight
  per row; with quantization at least that many zeros, since a kept weight can round to 0);
- write a folder that reloads to the weights of the same job run through the Python API in this process, bit
  for bit in one process (streamed or not), and for two ranks bit for bit where the statistics are exact sums
  (magnitude, Wanda, without quantization) and up to the summation order of fp32 Gram matrices otherwise.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from allpairspy import AllPairs
from conftest import one_thread, save_tiny, word_corpus
from test_distributed import _launch
from test_moe import _original

from wanda import PruneSettings, prune
from wanda.data import calibration_windows, resolve_source
from wanda.masks.pattern import SparsityPattern
from wanda.methods.registry import DSNOT_BASES
from wanda.models import find_decoder_layout, load_model
from wanda.quant import QuantSettings

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

NSAMPLES, SEQLEN, RATIO = 8, 32, 0.5
TIMEOUT = 300

FACTORS = {
    "method": ["magnitude", "wanda", "sparsegpt", "ria", "ablate_wanda_seq", "admm", "alps", "none"],
    "pattern": ["unstructured", "2:4", "4:8"],
    "model": ["llama", "opt", "mixtral"],
    "profile": ["uniform", "owl"],
    "dsnot": [False, True],
    "offload": ["none", "disk"],
    "save_format": ["dense", "compressed"],
    "ranks": [1, 2],
    "quant": ["fp", "4bit"],
}
NAMES = list(FACTORS)


def _problem(values: dict) -> str | None:
    """Why a combination is refused (None: valid)."""
    if values.get("profile") == "owl" and values.get("pattern", "unstructured") != "unstructured":
        return "owl with N:M"
    if values.get("dsnot") and values.get("method", "wanda") not in DSNOT_BASES:
        return "dsnot after a method it does not follow"
    if values.get("method") == "none" and values.get("quant", "4bit") == "fp":
        return "none without quantization"
    return None


def _valid_prefix(row: list) -> bool:
    return _problem(dict(zip(NAMES, row))) is None


def _pairs(case: dict) -> set:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(NAMES, 2)}


def _cover() -> list[dict]:
    """allpairspy's cover of the valid combinations; a pair its filtered greedy search missed gets the first
    valid combination that holds it."""
    cases = [dict(zip(NAMES, row)) for row in AllPairs(list(FACTORS.values()), filter_func=_valid_prefix)]
    every = [dict(zip(NAMES, row)) for row in itertools.product(*FACTORS.values())]
    held = set().union(*(_pairs(c) for c in cases))
    for case in every:
        if _problem(case) is None and not _pairs(case) <= held:
            cases.append(case)
            held |= _pairs(case)
    return cases


VALID = _cover()
#: one refused run for each pair only an invalid combination holds
_BASE = {**VALID[0], "method": "wanda", "quant": "fp"}
INVALID = (
    [{**_BASE, "profile": "owl", "pattern": pattern, "dsnot": False} for pattern in ("2:4", "4:8")]
    + [
        {**_BASE, "method": m, "dsnot": True, "profile": "uniform", "quant": "4bit" if m == "none" else "fp"}
        for m in FACTORS["method"]
        if m not in DSNOT_BASES
    ]
    + [{**_BASE, "method": "none", "dsnot": False}]
)


def _id(case: dict) -> str:
    return "-".join(
        f"{case['method']}_{case['pattern'].replace(':', 'of')}_{case['model']}_{case['profile']}"
        f"{'_dsnot' if case['dsnot'] else ''}_{case['offload']}_{case['save_format']}_{case['ranks']}r"
        f"{'_4bit' if case['quant'] == '4bit' else ''}".split()
    )


def test_the_cover_holds_every_valid_pair():
    """The drawn runs hold every pair of values that some valid combination holds (checked by enumerating every
    combination), and the refused runs every pair that only invalid ones hold."""
    pairs = _pairs
    every = [dict(zip(NAMES, row)) for row in itertools.product(*FACTORS.values())]
    possible = set().union(*(pairs(c) for c in every if _problem(c) is None))
    impossible = set().union(*(pairs(c) for c in every)) - possible
    assert all(_problem(c) is None for c in VALID)
    assert possible <= set().union(*(pairs(c) for c in VALID))
    assert impossible <= set().union(*(pairs(c) for c in INVALID))
    assert all(_problem(c) is not None for c in INVALID)
    assert any(c["profile"] == "owl" and c["offload"] == "disk" for c in VALID)  # the run that once crashed


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combinations")
    folders = {arch: save_tiny(root / arch, arch) for arch in ("llama", "opt")}
    mixtral = save_tiny(root / "mixtral", "llama")  # the word tokenizer, then the mixture's weights and config
    for f in mixtral.glob("model*.safetensors"):
        f.unlink()
    _original("mixtral").save_pretrained(mixtral)
    folders["mixtral"] = mixtral
    folders["corpus"] = word_corpus(root / "corpus.txt", words=3000)
    return folders


def _settings(case: dict) -> PruneSettings:
    return PruneSettings(
        prune_method=case["method"],
        sparsity_type=case["pattern"],
        sparsity_ratio=None if case["pattern"] != "unstructured" else RATIO,
        sparsity_profile=case["profile"],
        dsnot=case["dsnot"],
    )


def _flags(case: dict, inputs: dict, out: Path) -> list[str]:
    flags = [
        sys.executable,
        "-m",
        "wanda",
        "--model",
        str(inputs[case["model"]]),
        "--calib_dataset",
        str(inputs["corpus"]),
        "--eval_dataset",
        "none",
        "--nsamples",
        str(NSAMPLES),
        "--seqlen",
        str(SEQLEN),
        "--device",
        "cpu",
        "--prune_method",
        case["method"],
        "--sparsity_type",
        case["pattern"],
        "--sparsity_profile",
        case["profile"],
        "--offload",
        case["offload"],
        "--save_model",
        str(out / "model"),
        "--save_format",
        case["save_format"],
        "--save",
        str(out / "results"),
    ]
    if case["pattern"] == "unstructured":
        flags += ["--sparsity_ratio", str(RATIO)]
    if case["dsnot"]:
        flags += ["--dsnot"]
    if case["quant"] == "4bit":
        flags += ["--wbits", "4", "--groupsize", "32"]
    return flags


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _run(case: dict, inputs: dict, out: Path) -> list[dict]:
    command = _flags(case, inputs, out)
    if case["ranks"] == 1:
        done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
        return [{"code": done.returncode, "stderr": done.stderr, "stdout": done.stdout}]
    return _launch([command, command], out)


def _matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    layout = find_decoder_layout(model)
    return {
        name: matrix.weight.detach().clone()
        for index in range(len(layout.blocks))
        for name, matrix in layout.matrices(index).prunable.items()
    }


@functools.lru_cache(maxsize=None)
def _reference(
    model_folder: str, corpus: str, method: str, pattern: str, profile: str, dsnot: bool, quant: str
) -> dict:
    """The same job through the Python API, in memory, in one process: every parameter after pruning."""
    loaded = load_model(model_folder, device="cpu")
    source = resolve_source(corpus, "calibration")
    ids = calibration_windows(source, loaded.tokenizer, NSAMPLES, SEQLEN, 0)
    case = {"method": method, "pattern": pattern, "profile": profile, "dsnot": dsnot}
    quantization = QuantSettings(wbits=4, groupsize=32) if quant == "4bit" else None
    prune(loaded.model, ids, _settings(case), device="cpu", batch_size=2, progress=False, quant=quantization)
    return {name: p.detach().clone() for name, p in loaded.model.state_dict().items()}


def _check_exact_sparsity(matrices: dict[str, torch.Tensor], layers: list[dict], case: dict) -> None:
    """Exact counts; with quantization at least those (a kept weight may round to 0); ``none`` prunes nothing."""
    assert [layer["name"] for layer in layers] == list(matrices)
    if case["method"] == "none":
        return
    nm = SparsityPattern.parse(case["pattern"])
    rounded = case["quant"] == "4bit"
    for layer in layers:
        weight = matrices[layer["name"]]
        zeros = weight == 0
        if nm.is_nm:
            per_group = zeros.reshape(weight.shape[0], -1, nm.m).sum(-1)
            assert bool((per_group >= nm.n).all() if rounded else (per_group == nm.n).all()), (layer["name"], nm)
        else:
            expected, count = layer["ratio"] * weight.numel(), int(zeros.sum())
            low = count - expected >= -weight.shape[0]
            assert low and (rounded or count - expected <= weight.shape[0]), (layer["name"], count, expected)


@pytest.mark.parametrize("case", VALID, ids=[_id(c) for c in VALID])
def test_valid_combination(case, inputs, tmp_path):
    results = _run(case, inputs, tmp_path)
    for result in results:
        assert result["code"] == 0, result["stderr"][-3000:]
        assert "Traceback" not in result["stderr"]
    written = json.loads((tmp_path / "results" / f"results_{case['method']}.json").read_text())
    assert written.get("ranks", 1) == case["ranks"]
    reloaded = load_model(str(tmp_path / "model"), device="cpu").model
    matrices = _matrices(reloaded)
    _check_exact_sparsity(matrices, written["prune"]["layers"], case)

    reference = _reference(
        str(inputs[case["model"]]),
        str(inputs["corpus"]),
        case["method"],
        case["pattern"],
        case["profile"],
        case["dsnot"],
        case["quant"],
    )
    state = reloaded.state_dict()
    assert set(state) == set(reference)
    exact = case["ranks"] == 1 or (
        case["method"] in ("magnitude", "wanda") and not case["dsnot"] and case["quant"] == "fp"
    )
    for name, tensor in reference.items():
        if exact:
            assert torch.equal(state[name], tensor), name
        elif case["quant"] == "4bit":
            # quantized over two ranks: a weight at a rounding boundary can take the neighbouring code (a step
            # of 1/15 of its group's range at 4 bits), GPTQ's error feedback carries that along its row, each
            # later block reads the differently rounded outputs of the earlier ones, and ADMM/ALPS re-choose
            # their support from those; so the runs are compared on what both must hold (the grid, checked
            # below, and nearly the same zeros), not value by value
            agree = ((state[name] == 0) == (tensor == 0)).float().mean().item()
            assert agree >= 0.9, (name, agree)
        else:  # fp32 Gram sums over two ranks: the masks agree but for near-ties, the values to rounding
            agree = ((state[name] == 0) == (tensor == 0)).float().mean().item()
            # ALPS and ADMM re-choose the support over hundreds of iterations, so a tie decided by the last bit
            # of a summed Gram matrix can move a few more weights than SparseGPT's single pass
            assert agree >= (0.99 if case["method"] in ("admm", "alps") else 0.999), (name, agree)
            # a row whose mask agrees holds the same solve, to rounding; a near-tie that flipped moves its row
            ours, theirs = (
                state[name].double().reshape(tensor.shape[0], -1),
                tensor.double().reshape(tensor.shape[0], -1),
            )
            same = ((ours == 0) == (theirs == 0)).all(dim=1)
            assert same.float().mean().item() >= 0.9, (name, same.float().mean().item())
            difference = (ours[same] - theirs[same]).norm().item()
            assert difference <= 1e-3 * theirs[same].norm().item(), (name, difference)
    if case["quant"] == "4bit":  # every block matrix on a 4-bit grid: at most 16 values in each group of 32
        for name, weight in matrices.items():
            groups = weight.reshape(weight.shape[0], -1).reshape(-1, 32)
            assert max(len(torch.unique(g)) for g in groups) <= 16, name
    shutil.rmtree(tmp_path / "model")


@pytest.mark.parametrize("case", INVALID, ids=[_id(c) for c in INVALID])
def test_invalid_combination_is_one_line(case, inputs, tmp_path):
    for result in _run(case, inputs, tmp_path):
        assert result["code"] == 2, result["stderr"][-2000:]
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert len([line for line in lines if line.startswith("wanda: error:")]) == 1, lines
        assert "Traceback" not in result["stderr"]
    assert not (tmp_path / "model").exists()
