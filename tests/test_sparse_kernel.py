"""SparseLinear (bitmask + packed non-zeros) equals F.linear of the dense-with-zeros weight on every path.

Errors are relative (||y - y_ref|| / ||y_ref||): the kernels sum in a different order than dense matmul, so
exact equality is not expected, but fp32 accumulation keeps the difference at rounding level.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from wanda.kernels import (
    SparseLinear,
    available_paths,
    set_kernel_path,
    sparsify_linears,
)
from wanda.kernels import sparse_linear as sl

PATHS = ["reference", "portable", "avx2", "avx512"]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    denom = ref.norm().item()
    return (y - ref).norm().item() / denom if denom > 0 else (y - ref).norm().item()


def _require(path: str) -> None:
    if path not in available_paths():
        pytest.skip(f"kernel path {path} not available on this machine")


@pytest.fixture(autouse=True)
def _reset_path():
    yield
    set_kernel_path(None)


@st.composite
def _cases(draw):
    out_f = draw(st.integers(1, 70))
    in_f = draw(st.integers(1, 200))
    batch = draw(st.sampled_from([1, 2, 3, 5, 8, 9, 17, 64]))
    kind = draw(st.sampled_from(["random", "nm", "rows"]))
    sparsity = draw(st.floats(0.0, 0.99))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    bias = draw(st.booleans())
    lead3 = draw(st.booleans())
    gen_key = draw(st.integers(0, 2**31 - 1))
    return out_f, in_f, batch, kind, sparsity, dtype, bias, lead3, gen_key


def _weight(out_f: int, in_f: int, kind: str, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=gen)
    if kind == "random":
        w[torch.rand(out_f, in_f, generator=gen) < sparsity] = 0
    elif kind == "nm":
        m = 4 if in_f % 4 == 0 else 8
        n = max(1, round(m * (1 - sparsity)))
        cols = in_f - in_f % m
        blocks = w[:, :cols].clone().reshape(out_f, -1, m)
        drop = blocks.abs().argsort(-1)[..., : m - n]
        blocks.scatter_(-1, drop, 0.0)
        w[:, :cols] = blocks.reshape(out_f, cols)
    else:  # empty and full rows mixed with random ones
        for r in range(out_f):
            choice = r % 3
            if choice == 0:
                w[r] = 0
            elif choice == 2:
                w[r][torch.rand(in_f, generator=gen) < sparsity] = 0
    return w


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_matches_dense(path: str, case) -> None:
    _require(path)
    out_f, in_f, batch, kind, sparsity, dtype, use_bias, lead3, key = case
    gen = torch.Generator().manual_seed(key)
    w = _weight(out_f, in_f, kind, sparsity, gen).to(dtype)
    b = torch.randn(out_f, generator=gen) if use_bias else None
    x = torch.randn(batch, in_f, generator=gen).to(dtype)
    if lead3 and batch % 2 == 0:
        x = x.reshape(2, batch // 2, in_f)
    layer = SparseLinear.from_dense(w, bias=b)
    assert layer.values.dtype == dtype
    assert torch.equal(layer.to_dense(), w)
    set_kernel_path(path)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], out_f)
    # fp32 reference computed on the (already bf16-rounded) weights and inputs
    ref = F.linear(x.float(), w.float(), b)
    if dtype == torch.float32:
        assert _rel(y, ref) <= 1e-5
    else:
        # the kernel's fp32 result is exact to ~1e-6; the bf16 output rounding adds up to 2**-8 relative
        assert _rel(y, ref) <= 1e-2
        y32 = layer(x).float()
        assert _rel(y32, ref.to(dtype).float()) <= 1e-2


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_bf16_accumulates_in_fp32(path: str) -> None:
    """With fp32 inputs and bf16 values the result is the fp32 computation on the bf16-rounded weights."""
    _require(path)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(37, 150, generator=gen)
    w[torch.rand(37, 150, generator=gen) < 0.5] = 0
    layer = SparseLinear.from_dense(w, dtype=torch.bfloat16)
    x = torch.randn(3, 150, generator=gen)
    set_kernel_path(path)
    ref = F.linear(x, w.to(torch.bfloat16).float())
    assert _rel(layer(x), ref) <= 1e-5


def test_forced_reference_equals_compiled_paths() -> None:
    """The fallback path gives the same numbers as every compiled path, decode and prefill sizes alike."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(65, 131, generator=gen)
    w[torch.rand(65, 131, generator=gen) < 0.6] = 0
    layer = SparseLinear.from_dense(w, bias=torch.randn(65, generator=gen))
    for batch in (1, 4, 8, 33):
        x = torch.randn(batch, 131, generator=gen)
        set_kernel_path("reference")
        ref = layer(x)
        for path in available_paths()[1:]:
            set_kernel_path(path)
            assert _rel(layer(x), ref) <= 1e-5, (path, batch)


def test_env_variable_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDA_SPARSE_KERNEL", "reference")
    assert sl.get_kernel_path() == "reference"
    monkeypatch.setenv("WANDA_SPARSE_KERNEL", "auto")
    assert sl.get_kernel_path() == available_paths()[-1]  # the widest compiled path, else reference
    with pytest.raises(ValueError, match="unknown sparse kernel path"):
        set_kernel_path("sse9")
    for path in ("portable", "avx2", "avx512"):
        if path not in available_paths():
            with pytest.raises(RuntimeError, match=path):
                set_kernel_path(path)


def test_build_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sl, "_ext", None)
    monkeypatch.setattr(sl, "_ext_failed", False)
    monkeypatch.setattr(sl, "_cache_dir", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    with pytest.warns(RuntimeWarning, match="reference path"):
        assert sl.get_kernel_path() == "reference"
    w = torch.randn(5, 9)
    w[:, ::2] = 0
    x = torch.randn(2, 9)
    assert _rel(SparseLinear.from_dense(w)(x), x @ w.T) <= 1e-6


def test_sparsify_tiny_llama(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    with torch.no_grad():
        for name, mod in linears:
            w = mod.weight
            if name == "model.layers.1.mlp.down_proj":
                w[torch.rand_like(w) < 0.2] = 0  # 20% zeros: below the threshold, stays dense
            else:
                w[w.abs() < w.abs().median()] = 0  # 50% by magnitude
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref_prefill = model(ids).logits
        ref_decode = model(ids[:, :3]).logits
    with caplog.at_level(logging.INFO, logger="wanda.kernels.sparse_linear"):
        converted, kept = sparsify_linears(model, min_sparsity=0.3, least=0)  # tiny matrices: no size rule
    assert (converted, kept) == (len(linears) - 1, 1)
    assert "13 matrices sparse, 1 stayed dense (1 under 30% zeros)" in caplog.text
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, SparseLinear)
    assert isinstance(model.lm_head, nn.Linear)
    for path in available_paths():
        set_kernel_path(path)
        with torch.no_grad():
            assert _rel(model(ids).logits, ref_prefill) <= 1e-4, path
            assert _rel(model(ids[:, :3]).logits, ref_decode) <= 1e-4, path


def test_tied_embedding_is_skipped() -> None:
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    with torch.no_grad():
        emb.weight.zero_()
    model = nn.ModuleDict({"emb": emb, "out": head, "proj": nn.Linear(6, 6)})
    with torch.no_grad():
        model["proj"].weight[:, :3] = 0
    assert sparsify_linears(model, least=0) == (1, 0)  # a tiny matrix: no size rule
    assert isinstance(model["out"], nn.Linear) and isinstance(model["proj"], SparseLinear)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_decompression_is_bit_exact(path: str, case) -> None:
    """Each path's tile decompression (what the compiled prefill multiplies) equals the reference bit for bit,
    on whole matrices and on row ranges; the prefill output then matches the dense layer."""
    _require(path)
    out_f, in_f, _, kind, sparsity, dtype, use_bias, _, key = case
    gen = torch.Generator().manual_seed(key)
    w = _weight(out_f, in_f, kind, sparsity, gen).to(dtype)
    b = torch.randn(out_f, generator=gen) if use_bias else None
    layer = SparseLinear.from_dense(w, bias=b)
    set_kernel_path(path)
    assert torch.equal(layer.decompress(), w.float())
    r0 = out_f // 3
    assert torch.equal(layer.decompress(r0, out_f), w.float()[r0:])
    x = torch.randn(sl._DECODE_MAX_ROWS + 3, in_f, generator=gen)
    assert _rel(layer(x), F.linear(x, w.float(), b)) <= 1e-5


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_prefill_tiles_and_scratch(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill over several tiles (a tile smaller than the matrix) equals the dense layer, and the shared
    scratch buffer is one tile of the padded width, not a copy of the matrix."""
    _require(path)
    monkeypatch.setattr(sl, "PREFILL_TILE_ROWS", 16)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(70, 131, generator=gen)
    w[torch.rand(70, 131, generator=gen) < 0.5] = 0
    w[3] = 0
    layer = SparseLinear.from_dense(w, bias=torch.randn(70, generator=gen))
    set_kernel_path(path)
    x = torch.randn(2, 20, 131, generator=gen)
    assert _rel(layer(x), F.linear(x, w, layer.bias)) <= 1e-5
    assert 0 < sl.scratch_bytes() >= 16 * 192 * 4
