"""Pruning with ``--wbits``: mask-fixed GPTQ after each layer's mask and update (the methods without a column loop
of their own; SparseGPT's joint loop is in test_obs_quant.py) keeps every pruned zero, puts the kept weights on
the grid, and reconstructs each layer at least as well as round-to-nearest on the same mask."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import calib_ids, env, one_thread, save_tiny, tiny_model, word_corpus  # noqa: F401

import wanda.pruning.prune as prune_module
from wanda.engine.streaming import StreamSettings
from wanda.pruning.prune import needs_calibration, prune, statistics_needed
from wanda.pruning.prune_settings import PruneSettings
from wanda.quant.gptq import gptq_quantize, rtn_quantize
from wanda.quant.settings import QuantSettings
from wanda.stats import Gram, SquaredNorm, part

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

METHODS = ["magnitude", "wanda", "ria", "alps"]
PATTERNS = ["unstructured", "2:4"]


def _recorded_prune(monkeypatch, method: str, pattern: str, wbits: int, groupsize: int = 32, ratio: float = 0.5):
    """Prune the tiny llama with quantization; return (model, report, one record per quantized matrix in the
    order they were pruned: (weight before quantization, raw H = 2/n X^T X, quantized weight, group params))."""
    records: list[dict] = []
    real_quantize, real_gptq = prune_module._quantize, prune_module.gptq_quantize

    def gptq(*args, **kwargs):
        out, loss, params = real_gptq(*args, **{**kwargs, "return_params": True})
        records[-1].update(out=out.clone(), params=params)
        return (out, loss, params) if kwargs.get("return_params") else (out, loss)

    def quantize(weight, mask, stat, grid, settings):
        records.append(
            {
                "weight": weight.clone(),
                "mask": mask.clone(),
                "hessian": part(stat, Gram).hessian().clone(),
                "grid": grid,
            }
        )
        return real_quantize(weight, mask, stat, grid, settings)

    monkeypatch.setattr(prune_module, "_quantize", quantize)
    monkeypatch.setattr(prune_module, "gptq_quantize", gptq)
    model = tiny_model("llama")
    settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=ratio)
    quant = QuantSettings(wbits=wbits, groupsize=groupsize)
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    return model, report, records


def _error(new: torch.Tensor, ref: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W' - W) H (W' - W)^T): the layer's output error on the calibration inputs (up to the factor 2/n)."""
    d = (new - ref).double()
    return torch.einsum("ij,jk,ik->", d, hessian.double(), d).item()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("wbits", [4, 8])
def test_zeros_kept_values_on_grid_and_gptq_beats_rtn(monkeypatch, method, pattern, wbits):
    model, report, records = _recorded_prune(monkeypatch, method, pattern, wbits)
    params = dict(model.named_parameters())
    assert len(records) == len(report.layers) == 14  # 2 blocks x 7 linears
    for layer, rec in zip(report.layers, records):
        weight, out, grid = rec["weight"], rec["out"], rec["grid"]
        pruned = rec["mask"]
        assert bool((weight[pruned] == 0).all()), layer.name
        assert pruned.float().mean().item() >= 0.5, layer.name
        # every pruned zero is still exactly zero (+0.0), in the model too
        model_weight = params[layer.name + ".weight"].detach()
        assert torch.equal(model_weight, out), layer.name
        assert bool((out[pruned] == 0).all()), layer.name
        assert not torch.signbit(out[pruned]).any(), layer.name
        assert layer.quant_loss is not None
        # every weight lies on its group's grid: decoding its own code gives it back bit for bit
        g = grid.group_width(out.shape[1])
        for k, group in enumerate(rec["params"]):
            block = out[:, k * g : (k + 1) * g]
            assert torch.equal(grid.round(block, group), block), (layer.name, k)
            assert all(len(torch.unique(row)) <= 2**wbits for row in block), (layer.name, k)
        # joint GPTQ reconstructs the layer at least as well as round-to-nearest on the same mask
        gptq_error = _error(out, weight, rec["hessian"])
        rtn_error = _error(rtn_quantize(weight, grid, mask=pruned), weight, rec["hessian"])
        assert gptq_error <= rtn_error, (layer.name, gptq_error, rtn_error)
    sparsity = sum(
        (p.detach() == 0).sum().item() for n, p in params.items() if ".layers." in n and n.endswith("proj.weight")
    )
    assert sparsity / sum(l.shape[0] * l.shape[1] for l in report.layers) >= 0.5


@pytest.mark.parametrize(("method", "ratio"), [("none", 0.5), ("magnitude", 0.0)])
def test_quantization_alone_is_plain_gptq(monkeypatch, method, ratio):
    """``--prune_method none --wbits 4`` (and magnitude at ratio 0) quantizes the dense weights: plain GPTQ."""
    dense = {n: p.detach().clone() for n, p in tiny_model("llama").named_parameters()}
    model, report, records = _recorded_prune(monkeypatch, method, "unstructured", 4, ratio=ratio)
    assert len(records) == 14 and not any(rec["mask"].any() for rec in records)
    for layer, rec in zip(report.layers, records):
        if layer.name.startswith("model.layers.0."):  # block 0 reads the dense model's inputs
            assert torch.equal(rec["weight"], dense[layer.name + ".weight"]), layer.name
        expected, _ = gptq_quantize(rec["weight"], rec["hessian"], rec["grid"])
        assert torch.equal(rec["out"], expected), layer.name


def test_quantizing_adds_the_gram_and_calibration():
    quant = QuantSettings(wbits=4)
    magnitude = PruneSettings(prune_method="magnitude")
    assert not needs_calibration(magnitude) and needs_calibration(magnitude, quant)
    assert statistics_needed(magnitude, quant) == (Gram,)
    assert statistics_needed(PruneSettings(prune_method="wanda"), quant) == (SquaredNorm, Gram)
    assert statistics_needed(PruneSettings(prune_method="sparsegpt"), quant) == (Gram,)
    assert statistics_needed(PruneSettings(prune_method="none"), quant) == (Gram,)
    assert not needs_calibration(PruneSettings(prune_method="none"))
    assert statistics_needed(PruneSettings(prune_method="wanda"), QuantSettings()) == (SquaredNorm,)


def test_masks_do_not_change_when_quantizing():
    """Block 0 sees the same inputs with and without --wbits, so its masks must be the same."""
    settings = PruneSettings(prune_method="wanda", sparsity_ratio=0.5)
    plain, quantized = tiny_model("llama"), tiny_model("llama")
    prune(plain, calib_ids(), settings, progress=False)
    prune(quantized, calib_ids(), settings, progress=False, quant=QuantSettings(wbits=4, groupsize=32))
    for (name, a), (_, b) in zip(
        plain.model.layers[0].named_parameters(), quantized.model.layers[0].named_parameters()
    ):
        if name.endswith("proj.weight"):
            assert torch.equal(a == 0, b == 0), name
            assert not torch.equal(a, b), name  # and the kept weights did change


def _state(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_cli_wbits_saves_weights_on_the_grid(tmp_path, env, offload):  # noqa: F811
    folder = save_tiny(tmp_path, "llama")
    corpus = word_corpus(tmp_path / "corpus.txt", words=2000)
    out = tmp_path / "pruned"
    args = [
        *("--model", str(folder), "--calib_dataset", str(corpus), "--eval_dataset", str(corpus)),
        *("--seqlen", "32", "--nsamples", "8", "--eval_windows", "2", "--device", "cpu"),
        *("--prune_method", "wanda", "--sparsity_ratio", "0.5", "--wbits", "4", "--groupsize", "32"),
        *("--save_model", str(out), "--offload", offload, "--save", str(tmp_path / "results")),
    ]
    proc = subprocess.run([sys.executable, "-m", "wanda", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "results_wanda.json").read_text())
    assert results["prune"]["settings"]["quant"] == {"wbits": 4, "groupsize": 32, "sym": False, "gguf_type": None}
    assert results.get("streamed", False) == (offload == "disk")
    assert all(layer["quant_loss"] is not None for layer in results["prune"]["layers"])
    state = _state(out)
    checked = 0
    for name, weight in state.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        assert (weight == 0).float().mean().item() >= 0.5, name
        for row in weight.reshape(weight.shape[0], -1, 32).reshape(-1, 32):  # one group of 32 columns per row
            assert len(torch.unique(row[row != 0])) <= 2**4, name
        checked += 1
    assert checked == 14


def test_streamed_equals_in_memory_with_wbits(tmp_path):
    from wanda.export import save_model
    from wanda.models import load_model
    from wanda.pruning.streamed import prune_streamed

    folder = save_tiny(tmp_path, "llama")
    settings = PruneSettings(prune_method="sparsegpt", sparsity_ratio=0.5)
    quant = QuantSettings(wbits=4, groupsize=32)
    ids = calib_ids()
    model = load_model(str(folder), dtype="float32", device="cpu").model
    prune(model, ids, settings, device="cpu", progress=False, batch_size=2, quant=quant)
    save_model(model, None, tmp_path / "memory")
    prune_streamed(
        folder,
        ids,
        settings,
        StreamSettings(offload="disk"),
        save_model=tmp_path / "streamed",
        batch_size=2,
        progress=False,
        quant=quant,
    )
    memory, streamed = _state(tmp_path / "memory"), _state(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, streamed[name]), name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--wbits", "5"], "argument --wbits: invalid choice"),
        (["--wbits", "4", "--groupsize", "0"], "--groupsize must be -1"),
        (["--prune_method", "none"], "--prune_method none prunes nothing"),
        (["--prune_method", "sparsegpt", "--wbits", "4", "--groupsize", "96"], "that divides 128"),
    ],
)
def test_bad_quantization_flags_exit_2(flags, message, env):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "wanda", *flags], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("wanda: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
