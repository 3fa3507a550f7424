"""int8 SparseLinear (codes x per-group fp32 scales): every kernel path equals the reference path, the reference
equals x @ W.T of an independently quantized W, pruned weights stay exactly 0, and given scales are exact.

Tolerances are relative to the values compared (``assert_close``): the kernels sum per group and then scale,
in another order than the dense matmul, so equality is at fp32 rounding level, not bit for bit; the
decompressions (what prefill multiplies) are one fp32 product per weight and are compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sparse_kernel import _require, _reset_path  # noqa: F401  (the path guard and the autouse reset)
from torch import nn

from wanda.errors import WandaError
from wanda.kernels import SparseLinear, available_paths, set_kernel_path, sparsify_linears
from wanda.kernels import sparse_linear as sl

PATHS = ["reference", "portable", "avx2", "avx512"]


def _rtn(w: torch.Tensor, groupsize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 of w, group by group (dense result, scales): the specification, written apart
    from the package's padded-view version."""
    out_f, in_f = w.shape
    groups = -(-in_f // groupsize)
    dense = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, groups)
    for g in range(groups):
        block = w[:, g * groupsize : (g + 1) * groupsize].float()
        s = block.abs().amax(1) / 127
        scales[:, g] = s
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.round(block / safe[:, None]).clamp(-127, 127)
        dense[:, g * groupsize : (g + 1) * groupsize] = codes * s[:, None]
    return dense, scales


def _weight(out_f: int, in_f: int, kind: str, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen)
    if kind == "random":
        w[torch.rand(out_f, in_f, generator=gen) < sparsity] = 0
    else:  # empty, full and random rows
        for r in range(out_f):
            if r % 3 == 0:
                w[r] = 0
            elif r % 3 == 2:
                w[r][torch.rand(in_f, generator=gen) < sparsity] = 0
    return w


@st.composite
def _cases(draw):
    return dict(
        out_f=draw(st.integers(1, 70)),
        in_f=draw(st.integers(1, 300)),
        groupsize=draw(st.integers(1, 32).map(lambda k: 8 * k)),  # 8..256, dividing in_f or not
        batch=draw(st.sampled_from([1, 2, 3, 5, 8, 9, 17, 64])),
        kind=draw(st.sampled_from(["random", "rows"])),
        sparsity=draw(st.floats(0.0, 0.99)),
        xdtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        bias=draw(st.booleans()),
        key=draw(st.integers(0, 2**31 - 1)),
    )


def _check_output(y: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: rounding level; bf16: the output's own rounding (one bf16 step, 2**-8 relative) on top."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert_close(y.float(), ref.float(), rtol=1e-5 if y.dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_int8_paths_match_reference(path: str, case: dict) -> None:
    _require(path)
    gen = torch.Generator().manual_seed(case["key"])
    out_f, in_f, groupsize = case["out_f"], case["in_f"], case["groupsize"]
    w = _weight(out_f, in_f, case["kind"], case["sparsity"], gen)
    b = torch.randn(out_f, generator=gen) if case["bias"] else None
    x = torch.randn(case["batch"], in_f, generator=gen).to(case["xdtype"])
    layer = SparseLinear.from_dense(w, bias=b, dtype=torch.int8, groupsize=groupsize)
    dense, scales = _rtn(w, groupsize)
    assert layer.values.dtype == torch.int8 and layer.groupsize == groupsize
    assert torch.equal(layer.scales, scales)
    assert torch.equal(layer.to_dense(), dense) and layer.to_dense().dtype == torch.float32
    assert layer.nnz == int((w != 0).sum())
    assert not layer.to_dense()[w == 0].any()  # pruned weights are exactly 0
    set_kernel_path("reference")
    ref = layer(x)
    _check_output(ref, F.linear(x.float(), dense, b).to(x.dtype))
    set_kernel_path(path)
    assert torch.equal(layer.decompress(), dense)
    r0 = out_f // 3
    assert torch.equal(layer.decompress(r0, out_f), dense[r0:])
    _check_output(layer(x), ref)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases(), bits=st.sampled_from([8, 4]))
def test_given_scales_are_exact(path: str, case: dict, bits: int) -> None:
    """A weight that is integer codes times per-group scales (an 8-bit or 4-bit symmetric grid, some groups
    all zero with scale 0) comes back bit for bit, and every path computes with it."""
    _require(path)
    gen = torch.Generator().manual_seed(case["key"])
    out_f, in_f, groupsize = case["out_f"], case["in_f"], case["groupsize"]
    qmax = 2 ** (bits - 1) - 1
    groups = -(-in_f // groupsize)
    scales = torch.rand(out_f, groups, generator=gen) * 0.1 + 1e-3
    scales[torch.rand(out_f, groups, generator=gen) < 0.2] = 0
    codes = torch.randint(-qmax, qmax + 1, (out_f, in_f), generator=gen).float()
    codes[torch.rand(out_f, in_f, generator=gen) < case["sparsity"]] = 0
    w = codes * scales.repeat_interleave(groupsize, 1)[:, :in_f]
    layer = SparseLinear.from_dense(w, dtype=torch.int8, groupsize=groupsize, scales=scales)
    assert torch.equal(layer.to_dense(), w)
    assert torch.equal(layer.values[: layer.nnz].float(), codes[w != 0])
    set_kernel_path(path)
    assert torch.equal(layer.decompress(), w)
    x = torch.randn(case["batch"], in_f, generator=gen)
    _check_output(layer(x), F.linear(x, w))


@pytest.mark.parametrize("path", PATHS)
def test_zero_rows_give_exact_zeros(path: str) -> None:
    """A row with no kept weight has scale 0 throughout and its output is exactly 0 (decode and prefill)."""
    _require(path)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 100, generator=gen)
    w[torch.rand(20, 100, generator=gen) < 0.5] = 0
    w[::4] = 0
    layer = SparseLinear.from_dense(w, dtype=torch.int8, groupsize=32)
    assert not layer.scales[::4].any()
    set_kernel_path(path)
    for batch in (1, 5, 20):
        y = layer(torch.randn(batch, 100, generator=gen))
        assert not y[:, ::4].any()
        assert y[:, 1::4].ne(0).all()


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_prefill_tiles_int8(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill over several tiles with a bias and 3-D input equals the dense layer of the decompressed weight."""
    _require(path)
    monkeypatch.setattr(sl, "PREFILL_TILE_ROWS", 16)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(70, 131, generator=gen)
    w[torch.rand(70, 131, generator=gen) < 0.7] = 0
    layer = SparseLinear.from_dense(w, bias=torch.randn(70, generator=gen), dtype=torch.int8, groupsize=24)
    set_kernel_path(path)
    x = torch.randn(2, 20, 131, generator=gen)
    assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))


def test_storage_is_one_byte_per_kept_weight() -> None:
    """0.5 + 1/8 + 4/G bytes per weight at 50%: int8 codes, the same mask as fp32, and one fp32 per group."""
    w = torch.randn(64, 512)
    w[:, ::2] = 0
    fp32 = SparseLinear.from_dense(w)
    q = SparseLinear.from_dense(w, dtype=torch.int8, groupsize=128)
    assert q.values.element_size() == 1 and q.values.numel() == fp32.values.numel()
    assert torch.equal(q.mask, fp32.mask) and torch.equal(q.offsets, fp32.offsets)
    assert q.scales.shape == (64, 4) and q.scales.dtype == torch.float32
    per_weight = (q.nnz + q.mask.numel() + 4 * q.scales.numel()) / w.numel()
    assert per_weight == 0.5 + 1 / 8 + 4 / 128
    assert "groupsize=128" in repr(q)


def test_bad_inputs_are_refused() -> None:
    w = torch.randn(6, 40)
    with pytest.raises(WandaError, match="multiple of 8"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=12)
    with pytest.raises(WandaError, match="multiple of 8"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=0)
    with pytest.raises(WandaError, match=r"shape \(6, 3\)"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=16, scales=torch.ones(6, 2))
    with pytest.raises(WandaError, match="fp32"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=16, scales=torch.ones(6, 3, dtype=torch.float64))
    with pytest.raises(WandaError, match=">= 0"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=16, scales=-torch.ones(6, 3))
    with pytest.raises(WandaError, match="outside the given scales"):
        SparseLinear.from_dense(w, dtype=torch.int8, groupsize=16, scales=torch.full((6, 3), 1e-4))
    with pytest.raises(WandaError, match="only for int8"):
        SparseLinear.from_dense(w, dtype=torch.float32, scales=torch.ones(6, 1))
    good = SparseLinear.from_dense(w, dtype=torch.int8, groupsize=16)
    with pytest.raises(WandaError, match="need scales"):
        SparseLinear(good.values, good.mask, good.offsets, 40, 6, groupsize=16)
    with pytest.raises(WandaError, match="only for int8"):
        SparseLinear(good.values.float(), good.mask, good.offsets, 40, 6, scales=good.scales)


def test_compiled_entry_checks_scales() -> None:
    """The extension refuses int8 values without matching scales itself (it never reads past a buffer)."""
    if len(available_paths()) < 2:
        pytest.skip("the compiled extension is not available")
    layer = SparseLinear.from_dense(torch.randn(6, 40), dtype=torch.int8, groupsize=16)
    ext, x = sl._ext, torch.randn(1, 40)
    with pytest.raises(RuntimeError, match="need scales"):
        ext.sparse_linear(x, layer.values, layer.mask, layer.offsets, None, None, 16, 40, 0, 8, 512, 0)
    with pytest.raises(RuntimeError, match="scales must be"):
        ext.sparse_linear(x, layer.values, layer.mask, layer.offsets, None, layer.scales[:, :2].contiguous(), 16,
                          40, 0, 8, 512, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match="groupsize"):
        ext.decompress(layer.values, layer.mask, layer.offsets, layer.scales, 12, 0, 6, 40, 0)


def test_sparsify_linears_int8() -> None:
    """sparsify_linears(dtype=int8) converts with round-to-nearest scales of the asked group size; the model then
    computes what the dense model with those quantized weights computes, on every path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 48, bias=False))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight[lin.weight.abs() < lin.weight.abs().median()] = 0
    quantized = [_rtn(lin.weight.detach(), 32)[0] for lin in (model[0], model[2])]
    reference = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 48, bias=False))
    with torch.no_grad():
        reference[0].weight.copy_(quantized[0])
        reference[0].bias.copy_(model[0].bias)
        reference[2].weight.copy_(quantized[1])
    assert sparsify_linears(model, dtype=torch.int8, groupsize=32, least=0) == (2, 0)
    assert all(m.groupsize == 32 and m.values.dtype == torch.int8 for m in (model[0], model[2]))
    x = torch.randn(3, 48)
    with torch.no_grad():
        expected = reference(x)
        for path in available_paths():
            set_kernel_path(path)
            assert_close(model(x), expected)


def test_saved_int8_model_holds_its_fp32_weights() -> None:
    """The state a model with int8 layers saves (``save_compressed``'s dense view of it) is the dense fp32
    weight those layers stand for, with an fp32 bias, as a dense model holding those weights has it."""
    from wanda.models.compressed import _dense_state

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 24))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    sparsify_linears(model, dtype=torch.int8, groupsize=16, least=0)
    state = _dense_state(model)
    assert list(state) == ["0.weight", "0.bias"]
    assert state["0.weight"].dtype == torch.float32 and torch.equal(state["0.weight"], model[0].to_dense())
    assert state["0.bias"].dtype == torch.float32 and torch.equal(state["0.bias"], model[0].bias)


def test_cpu_speed_counts_the_scales() -> None:
    from wanda.eval.cpu_speed import layer_bytes

    w = torch.randn(64, 512)
    w[:, ::2] = 0
    q = SparseLinear.from_dense(w, dtype=torch.int8, groupsize=128)
    assert layer_bytes(q) == (q.nnz + 16) + q.mask.numel() + 8 * (64 + 1) + 4 * 64 * 4
    assert q.weight_dtype == torch.float32
