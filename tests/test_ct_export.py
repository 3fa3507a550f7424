"""``--save_format compressed-tensors``: the pack-quantized folder vLLM loads, written with the library's own
compressor, decoded by its own decompressor into the weights we computed bit for bit, pruned zeros exactly 0,
loaded by transformers; and GPTQ's integer grid is the library's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import calib_ids, env, one_thread, save_tiny, tiny_model, word_corpus  # noqa: F401

from wanda.export import save_model
from wanda.export.compressed_tensors import QuantizedModel
from wanda.pruning.prune import prune
from wanda.pruning.prune_settings import PruneSettings
from wanda.quant.grid import QuantGrid
from wanda.quant.settings import QuantSettings

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _args(bits: int, groupsize: int, sym: bool) -> QuantizationArgs:
    if groupsize == -1:
        return QuantizationArgs(num_bits=bits, type="int", strategy="channel", symmetric=sym, dynamic=False)
    return QuantizationArgs(num_bits=bits, type="int", strategy="group", group_size=groupsize, symmetric=sym)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("groupsize", [32, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_our_integer_grid_is_the_librarys(bits, groupsize, sym):
    """Scales, zero-points, codes and values of ``QuantGrid`` equal compressed-tensors' ``calculate_qparams``,
    ``quantize`` and ``dequantize`` bit for bit (weights of many magnitudes, half pruned, a group of zeros)."""
    g = torch.Generator().manual_seed(bits * 10 + (groupsize > 0))
    w = torch.randn(24, 96, generator=g) * torch.logspace(-4, 1, 24).unsqueeze(1)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0
    w[3, :32] = 0
    w[5] = w[5].abs()  # a group with no negative weight: the zero-point at the range's end
    grid = QuantGrid(bits, groupsize, sym)
    args = _args(bits, groupsize, sym)
    width = 96 if groupsize == -1 else groupsize
    groups = w.reshape(24, -1, width)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    ours = [grid.fit(w[:, k : k + width]) for k in range(0, 96, width)]
    ours_scale = torch.cat([p.scale for p in ours], 1)
    ours_zero = torch.cat([p.zero for p in ours], 1)
    assert torch.equal(ours_scale, scale)
    if sym:
        assert (ours_zero == 0).all()
    else:
        live = groups.abs().amax(-1) > 0  # for a group of zeros any zero-point decodes 0 (the library's is 0/0)
        assert torch.equal(ours_zero[live], zero.float()[live])
    zp = None if sym else ours_zero.to(torch.int8)
    codes = quantize(w, ours_scale, zp, args, dtype=torch.int8)
    ours_codes = torch.cat([grid.encode(w[:, k : k + width], p) for k, p in zip(range(0, 96, width), ours)], 1)
    assert torch.equal(ours_codes, codes.float())
    assert torch.equal(grid.quantize(w), dequantize(codes, ours_scale, zp, args))
    assert (grid.quantize(w)[w == 0] == 0).all()


def _pruned(method: str, pattern: str, bits: int, groupsize: int):
    model = tiny_model("llama")
    settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=0.5)
    quant = QuantSettings(wbits=bits, groupsize=groupsize, sym=True)
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    return model, QuantizedModel(report.quantized, bits, groupsize, True)


CASES = [("wanda", "unstructured", 4, 32), ("sparsegpt", "2:4", 8, 32), ("sparsegpt", "unstructured", 4, -1)]


@pytest.mark.parametrize(("method", "pattern", "bits", "groupsize"), CASES)
def test_library_decompresses_our_weights_bit_for_bit(tmp_path, method, pattern, bits, groupsize):
    from safetensors.torch import load_file

    model, quantized = _pruned(method, pattern, bits, groupsize)
    out = tmp_path / "ct"
    save_model(model, None, out, "compressed-tensors", quantized=quantized)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "sparsity_config" not in config
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, True, "int")
    assert config["ignore"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    scheme = QuantizationScheme(targets=["Linear"], weights=_args(bits, groupsize, True))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(names) == 14 and len(quantized.matrices) == 14
    for name in names:
        assert f"{name}.weight" not in tensors, name  # written packed only
        local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        back = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        ours = model.get_submodule(name).weight.detach()
        assert torch.equal(back, ours), name
        zeros = ours == 0
        assert zeros.float().mean().item() >= 0.5, name
        assert (back[zeros] == 0).all(), name
    # the rest of the model is written as it is
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())


def test_transformers_loads_the_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model, quantized = _pruned("sparsegpt", "unstructured", 4, 32)
    out = tmp_path / "ct"
    save_model(model, None, out, "compressed-tensors", quantized=quantized)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        got = loaded(ids).logits  # the first forward decompresses (the library's hook)
        want = model(ids).logits
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(loaded.get_submodule(name).weight, module.weight), name
    assert torch.equal(got, want)


def test_cli_writes_compressed_tensors(tmp_path, env):  # noqa: F811
    folder = save_tiny(tmp_path)
    corpus = word_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    args = [
        *("--model", str(folder), "--calib_dataset", str(corpus), "--eval_dataset", str(corpus)),
        *("--seqlen", "32", "--nsamples", "4", "--eval_windows", "1", "--device", "cpu"),
        *("--prune_method", "wanda", "--sparsity_type", "2:4", "--wbits", "4", "--groupsize", "32", "--sym"),
        *("--save_format", "compressed-tensors", "--save_model", str(out), "--save", str(tmp_path / "res")),
    ]
    proc = subprocess.run([sys.executable, "-m", "wanda", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config["quantization_config"]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--save_format", "compressed-tensors", "--save_model", "x"], "pass --wbits 4 or 8 with --sym"),
        (["--save_format", "compressed-tensors", "--save_model", "x", "--wbits", "4"], "with --sym"),
        (["--save_format", "compressed-tensors", "--save_model", "x", "--wbits", "3", "--sym"], "--wbits 4 or 8"),
        (["--save_format", "compressed-tensors", "--wbits", "4", "--sym"], "writes --save_model"),
        (
            ["--save_format", "compressed-tensors", "--save_model", "x", "--wbits", "4", "--sym", "--offload", "disk"],
            "compressed-tensors needs the model in memory",
        ),
    ],
)
def test_bad_compressed_tensors_flags_exit_2(tmp_path, flags, message, env):  # noqa: F811
    folder = save_tiny(tmp_path)
    flags = [str(tmp_path / "out") if f == "x" else f for f in flags]
    proc = subprocess.run(
        [sys.executable, "-m", "wanda", "--model", str(folder), "--device", "cpu", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("wanda: error: ") and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
