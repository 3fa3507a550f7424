"""The sparse kernel on a compressed-tensors pack-quantized folder: the file's codes and scales become int8
SparseLinear layers as they are, so each layer's weight equals the library's decompressed weight bit for bit
(and the weight wanda pruned and quantized), every pruned weight is exactly 0, the model's logits are the
dense model's of those weights; a grid int8 cannot hold keeps float values with one line saying why, and
``--sparse_values`` refuses what it cannot do."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, calib_ids, env, one_thread, save_tiny, tiny_model, word_corpus  # noqa: F401
from torch import nn

from wanda.errors import WandaError
from wanda.export import save_model
from wanda.export.compressed_tensors import QuantizedModel
from wanda.kernels import SparseLinear
from wanda.models import SparseKernelSettings, load_model
from wanda.pruning.prune import prune
from wanda.pruning.prune_settings import PruneSettings
from wanda.quant.settings import QuantSettings

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(autouse=True)
def _tiny_matrices_convert(monkeypatch):
    """The tiny model's matrices are far under the load rule's size threshold; lifted to check the kernel."""
    monkeypatch.setenv("WANDA_SPARSE_MIN_WEIGHTS", "0")


def _pruned(bits: int, groupsize: int, sym: bool, **overrides):
    """A tiny llama pruned to 50% with GPTQ on the grid, and its matrices' grid parameters."""
    model = tiny_model("llama", **overrides)
    settings = PruneSettings(prune_method="sparsegpt", sparsity_type="unstructured", sparsity_ratio=0.5)
    quant = QuantSettings(wbits=bits, groupsize=groupsize, sym=sym)
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    return model, QuantizedModel(report.quantized, bits, groupsize, sym)


def _library_folder(model: nn.Module, quantized: QuantizedModel, out, scale_dtype: torch.dtype) -> None:
    """A pack-quantized folder written by the library itself, as llm-compressor writes them (wanda writes
    symmetric 4- and 8-bit ones with fp32 scales): the steps of ``save_compressed_tensors``, any width, with
    the zero-points of an asymmetric grid and scales in ``scale_dtype``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, apply_quantization_config

    args = QuantizationArgs(
        num_bits=quantized.bits,
        type="int",
        strategy="group",
        group_size=quantized.groupsize,
        symmetric=quantized.sym,
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        format="pack-quantized",
    )
    clone = copy.deepcopy(model)
    apply_quantization_config(clone, config)
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for q in quantized.matrices.values():
            module = clone.get_submodule(names[id(q.module)])
            module.weight_scale.data = q.scale.to(scale_dtype)
            if not quantized.sym:
                module.weight_zero_point.data = q.zero.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(clone, "pack-quantized")
    compressor.compress_model(clone)
    clone.save_pretrained(out)
    compressor.update_config(str(out))


_CACHE: dict = {}


def _folder(tmp_path_factory, bits: int, groupsize: int, sym: bool = True, scale_dtype=None, **overrides):
    """(pruned model, pack-quantized folder with a tokenizer), built once per grid: written by wanda, or by
    the library when asymmetric, of a width wanda does not write, or with ``scale_dtype`` scales."""
    key = (bits, groupsize, sym, scale_dtype, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        model, quantized = _pruned(bits, groupsize, sym, **overrides)
        out = tmp_path_factory.mktemp("ct") / "model"
        if sym and bits in (4, 8) and scale_dtype is None:
            save_model(model, None, out, "compressed-tensors", quantized=quantized)
        else:
            _library_folder(model, quantized, out, scale_dtype or torch.float32)
        _add_tokenizer(out, tmp_path_factory)
        _CACHE[key] = (model, out)
    return _CACHE[key]


def _add_tokenizer(out, tmp_path_factory) -> None:
    """The tiny model's tokenizer files beside a saved folder (made once per session)."""
    if "tokenizer" not in _CACHE:
        _CACHE["tokenizer"] = save_tiny(tmp_path_factory.mktemp("tok"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(_CACHE["tokenizer"] / name, out / name)


def _decompressed(folder) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as the library's decompressor gives it, from the file."""
    from safetensors.torch import load_file

    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(quant).config_groups["group_0"]
    tensors = load_file(folder / "model.safetensors")
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")})
    out = {}
    for name in names:
        local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        out[name] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out


def _dense_model(folder, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain transformers model built from the file's tensors and the decompressed weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    state = {k: v for k, v in load_file(folder / "model.safetensors").items() if k in model.state_dict()}
    state.update({f"{name}.weight": w for name, w in weights.items()})
    model.load_state_dict(state, strict=True)
    return model


GRIDS = [(8, 32, {}), (4, 32, {}), (4, -1, {"hidden_size": 44, "intermediate_size": 60})]


@pytest.mark.parametrize(("bits", "groupsize", "overrides"), GRIDS, ids=["w8g32", "w4g32", "w4row"])
def test_quantized_folder_loads_as_int8_exactly(tmp_path_factory, bits, groupsize, overrides, caplog):
    """Per row (-1) on 44 and 60 columns: one group of 48 and of 64 columns, past in_features no mask bits."""
    pruned, folder = _folder(tmp_path_factory, bits, groupsize, **overrides)
    with caplog.at_level(logging.INFO, logger="wanda.models.loading"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    assert "14 linear matrices sparse (14 with int8 values), 0 stayed dense" in caplog.text
    library = _decompressed(folder)
    assert len(library) == 14
    for name, weight in library.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.values.dtype == torch.int8, name
        want = -(-layer.in_features // 8) * 8 if groupsize == -1 else groupsize
        assert layer.groupsize == want, name
        assert torch.equal(layer.to_dense(), weight), name
        assert torch.equal(layer.decompress(), weight), name  # the compiled path's decompression too
        ours = pruned.get_submodule(name).weight.detach()
        assert torch.equal(layer.to_dense(), ours), name  # the weight wanda pruned and quantized
        pruned_zero = ours == 0
        assert pruned_zero.float().mean().item() >= 0.5, name
        assert (layer.to_dense()[pruned_zero] == 0).all(), name
        assert layer.nnz == int((~pruned_zero).sum()), name  # a pruned weight has no mask bit
    lowest = min(int(model.get_submodule(name).values.min()) for name in library)
    assert lowest == -(2 ** (bits - 1))  # the grid's lowest code (8 bits: -128, which wanda's own int8 never uses)
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    dense = _dense_model(folder, library)
    ids = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5)
        assert_close(model(ids[:1, :1]).logits, dense(ids[:1, :1]).logits, rtol=1e-5)  # one token: decode


def test_bf16_model_keeps_int8_layers(tmp_path_factory):
    _, folder = _folder(tmp_path_factory, 4, 32)
    model = load_model(str(folder), dtype="bfloat16", device="cpu", sparse_kernel=True).model
    library = _decompressed(folder)
    for name, weight in library.items():
        layer = model.get_submodule(name)
        assert layer.values.dtype == torch.int8 and torch.equal(layer.to_dense(), weight), name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = calib_ids(1, 8, seed=2)
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_asymmetric_4_bit_loads_as_int8(tmp_path_factory):
    """code - zero-point of a 4-bit grid lies in [-15, 15]: int8, exactly the library's weights."""
    pruned, folder = _folder(tmp_path_factory, 4, 32, sym=False)
    assert not json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"
    ]["symmetric"]
    model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    library = _decompressed(folder)
    for name, weight in library.items():
        layer = model.get_submodule(name)
        assert layer.values.dtype == torch.int8, name
        assert torch.equal(layer.to_dense(), weight), name
        ours = pruned.get_submodule(name).weight.detach()
        assert (layer.to_dense()[ours == 0] == 0).all(), name
    with torch.no_grad():
        ids = calib_ids(2, 16, seed=1)
        assert_close(model(ids).logits, _dense_model(folder, library)(ids).logits, rtol=1e-5)


def test_other_widths_and_bf16_scales(tmp_path_factory):
    """A 2-bit symmetric folder is int8 too; scales stored in bf16 widen exactly, so the int8 weight is the
    exact product, which rounded to bf16 is the library's bf16 decompressed weight."""
    for bits, scale_dtype in ((2, None), (4, torch.bfloat16)):
        pruned, folder = _folder(tmp_path_factory, bits, 32, scale_dtype=scale_dtype)
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
        for name, weight in _decompressed(folder).items():
            layer = model.get_submodule(name)
            assert layer.values.dtype == torch.int8, name
            assert weight.dtype == (scale_dtype or torch.float32), name
            assert torch.equal(layer.to_dense().to(weight.dtype), weight), name
            assert (layer.to_dense()[pruned.get_submodule(name).weight == 0] == 0).all(), name
            if scale_dtype is not None:
                assert torch.equal(layer.scales, layer.scales.to(scale_dtype).float()), name  # bf16 values


@pytest.mark.parametrize(
    ("bits", "groupsize", "sym", "why"),
    [
        (8, 32, False, "8-bit asymmetric codes minus their zero-point span beyond int8"),
        (8, 4, True, "groups of 4 columns are not a multiple of 8"),
    ],
)
def test_grid_int8_cannot_hold_keeps_float_values(tmp_path_factory, caplog, bits, groupsize, sym, why):
    _, folder = _folder(tmp_path_factory, bits, groupsize, sym=sym)
    with caplog.at_level(logging.INFO, logger="wanda.models.sparse_load"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    lines = [r.getMessage() for r in caplog.records if r.name == "wanda.models.sparse_load"]
    assert len(lines) == 1 and "14 matrices keep float32 values, not int8: " in lines[0] and why in lines[0], lines
    for name, weight in _decompressed(folder).items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.values.dtype == torch.float32, name
        assert torch.equal(layer.to_dense(), weight), name
    with pytest.raises(WandaError, match=f"--sparse_values int8: .* cannot be int8: {why}"):
        load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True, sparse_values="int8")


def test_float_values_and_the_load_rule(tmp_path_factory, monkeypatch):
    _, folder = _folder(tmp_path_factory, 8, 32)
    library = _decompressed(folder)
    model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True, sparse_values="float").model
    for name, weight in library.items():
        layer = model.get_submodule(name)
        assert layer.values.dtype == torch.float32 and torch.equal(layer.to_dense(), weight), name
    monkeypatch.delenv("WANDA_SPARSE_MIN_WEIGHTS")  # the default threshold: every tiny matrix stays dense
    model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    for name, weight in library.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight), name


def test_int8_refused_on_an_unquantized_folder(tmp_path):
    folder = save_tiny(tmp_path)
    with pytest.raises(WandaError, match="--sparse_values int8 keeps a quantized folder's codes, but .* is not"):
        load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True, sparse_values="int8")


def test_sparse_values_settings_refusals():
    with pytest.raises(WandaError, match="pass --sparse_kernel"):
        SparseKernelSettings(sparse_values="int8")
    with pytest.raises(WandaError, match="--sparse_values must be one of auto, float, int8"):
        SparseKernelSettings(sparse_kernel=True, sparse_values="int4")
    assert SparseKernelSettings(sparse_kernel=True, sparse_values="float").sparse_values == "float"


def _wanda(args, env):  # noqa: F811
    return subprocess.run([sys.executable, "-m", "wanda", *args], env=env, capture_output=True, text=True, timeout=600)


def test_cli_eval_sparse_kernel_on_compressed_tensors(tmp_path, env):  # noqa: F811
    folder = save_tiny(tmp_path)
    corpus = word_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    common = ["--eval_dataset", str(corpus), "--seqlen", "32", "--eval_windows", "1", "--device", "cpu"]
    prune_args = [
        *("--model", str(folder), "--calib_dataset", str(corpus), "--nsamples", "4", *common),
        *("--prune_method", "wanda", "--sparsity_ratio", "0.5", "--wbits", "8", "--groupsize", "32", "--sym"),
        *("--save_format", "compressed-tensors", "--save_model", str(out), "--save", str(tmp_path / "res")),
    ]
    proc = _wanda(prune_args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_env = {**env, "WANDA_SPARSE_MIN_WEIGHTS": "0"}
    proc = _wanda(["eval", "--model", str(out), *common, "--sparse_kernel", "--save", str(tmp_path / "ev")], run_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 linear matrices sparse (14 with int8 values)" in proc.stderr + proc.stdout
    proc = _wanda(["eval", "--model", str(out), *common, "--sparse_values", "int8"], run_env)
    assert proc.returncode == 2 and proc.stderr.startswith("wanda eval: error: "), proc.stderr[-2000:]
    assert "--sparse_values int8 sets the values of the sparse kernel's layers: pass --sparse_kernel" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- dense and compressed folders of a --wbits prune: the scales recorded beside the weights ----------------


def _saved(tmp_path_factory, fmt: str, bits: int, groupsize: int, sym: bool):
    key = ("saved", fmt, bits, groupsize, sym)
    if key not in _CACHE:
        model, quantized = _pruned(bits, groupsize, sym)
        out = tmp_path_factory.mktemp("grid") / "model"
        save_model(model, None, out, fmt, quantized=quantized)
        _add_tokenizer(out, tmp_path_factory)
        _CACHE[key] = (model, out)
    return _CACHE[key]


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
@pytest.mark.parametrize(("bits", "groupsize", "sym"), [(8, 32, True), (4, 32, False), (4, -1, True)])
def test_recorded_grid_loads_as_int8_exactly(tmp_path_factory, fmt, bits, groupsize, sym, caplog):
    from safetensors import safe_open

    from wanda.models.grid_record import GRID_NAME
    from wanda.pruning.space import grid_bytes

    pruned, folder = _saved(tmp_path_factory, fmt, bits, groupsize, sym)
    with safe_open(str(folder / GRID_NAME), "pt") as handle:
        stored = sum(handle.get_tensor(k).nbytes for k in handle.keys())
    assert grid_bytes(pruned, groupsize) == stored  # the free-space check sizes the record exactly
    with caplog.at_level(logging.INFO, logger="wanda.models"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    assert "14 linear matrices sparse (14 with int8 values), 0 stayed dense" in caplog.text
    assert not [r for r in caplog.records if r.name == "wanda.models.sparse_load"]  # no fallback line
    for name, module in pruned.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        layer, ours = model.get_submodule(name), module.weight.detach()
        assert isinstance(layer, SparseLinear) and layer.values.dtype == torch.int8, name
        assert torch.equal(layer.to_dense(), ours), name  # the prune's dequantized weight, bit for bit
        assert layer.nnz == int((ours != 0).sum()) and (ours == 0).float().mean() >= 0.5, name
    ids = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        assert_close(model(ids).logits, pruned(ids).logits, rtol=1e-5)


def test_recorded_grid_falls_back_where_int8_cannot_hold_it(tmp_path_factory, caplog):
    """8-bit asymmetric: code - zero-point up to 255 steps; a weight changed after saving: off the grid."""
    pruned, folder = _saved(tmp_path_factory, "dense", 8, 32, False)
    with caplog.at_level(logging.INFO, logger="wanda.models.sparse_load"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    lines = [r.getMessage() for r in caplog.records if r.name == "wanda.models.sparse_load"]
    assert len(lines) == 1 and "matrices keep float32 values, not int8: codes beyond int8" in lines[0], lines
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = model.get_submodule(name)
            assert layer.values.dtype in (torch.float32, torch.int8), name
            assert torch.equal(layer.to_dense(), module.weight.detach()), name
    with pytest.raises(WandaError, match="--sparse_values int8: .* cannot be int8: codes beyond int8"):
        load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True, sparse_values="int8")


def test_recorded_grid_checks_the_weights(tmp_path):
    """A weight moved off the grid after the scales were recorded keeps float values: the record is checked."""
    from safetensors.torch import load_file, save_file

    model, quantized = _pruned(4, 32, True)
    out = tmp_path / "model"
    save_model(model, None, out, "dense", quantized=quantized)
    save_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tiny-llama" / name, out / name)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key] * 1.0001
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(str(out), dtype="float32", device="cpu", sparse_kernel=True).model
    layer = loaded.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.values.dtype == torch.float32 and torch.equal(layer.to_dense(), tensors[key])
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").values.dtype == torch.int8


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0"])
def test_gguf_grid_saved_compressed_loads_as_int8(tmp_path, kind):
    """GPTQ on a GGUF block grid (fp16 scales per 32 weights; Q4_0's may be negative, code x -s being
    -code x s exactly) saved compressed: int8 layers with the prune's weights bit for bit."""
    bits = 4 if kind == "Q4_0" else 8
    model = tiny_model("llama")
    settings = PruneSettings(prune_method="sparsegpt", sparsity_type="unstructured", sparsity_ratio=0.5)
    quant = QuantSettings(wbits=bits, groupsize=32, sym=True, gguf_type=kind)
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    out = tmp_path / "model"
    save_model(model, None, out, "compressed", quantized=QuantizedModel(report.quantized, bits, 32, True))
    tokenizer = save_tiny(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    if kind == "Q4_0":
        assert any(bool((q.scale < 0).any()) for q in report.quantized.values())
    loaded = load_model(str(out), dtype="float32", device="cpu", sparse_kernel=True).model
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            layer = loaded.get_submodule(name)
            assert layer.values.dtype == torch.int8, name
            assert torch.equal(layer.to_dense(), module.weight.detach()), name
