"""load_model(sparse_kernel=True): SparseLinear layers built tensor by tensor from a compressed or a dense folder.

The sparse model must compute what the dense-with-zeros model computes (logits relative error at rounding
level), keep the embeddings/head and weakly sparse matrices dense, and save back to the same compressed tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wanda.kernels import SparseLinear
from wanda.models import load_model
from wanda.models.compressed import load_compressed_state_dict, same_bits, save_compressed


@pytest.fixture(autouse=True)
def _tiny_matrices_convert(monkeypatch):
    """These tiny models' matrices (a few thousand weights) are far under the load rule's size threshold;
    the tests check the kernel on them, so the threshold is lifted (the rule itself: test_load_rule_*)."""
    monkeypatch.setenv("WANDA_SPARSE_MIN_WEIGHTS", "0")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / b.norm().item()


def _config(kind: str):
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig

    if kind == "llama":
        return LlamaConfig(
            vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
    if kind == "opt":
        return OPTConfig(
            vocab_size=128, hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=48,
        )  # fmt: skip
    return Gemma3TextConfig(
        vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip


def _pruned_folder(tmp_path, kind: str, dtype: torch.dtype, fmt: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind)).to(dtype).eval()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    with torch.no_grad():
        for i, (_, lin) in enumerate(linears):
            if i == 0:
                continue  # one matrix stays dense: under the 30% threshold
            w = lin.weight
            k = int(w.shape[1] * 0.6)
            idx = w.abs().argsort(dim=1)[:, :k]
            w.scatter_(1, idx, 0.0)
    folder = tmp_path / f"{kind}-{fmt}"
    folder.mkdir()
    if fmt == "compressed":
        save_compressed(model, folder)
    else:
        model.save_pretrained(folder)
    _tokenizer(folder)
    return model, folder, len(linears)


def _tokenizer(folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(120)}
    vocab["[UNK]"] = 120
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


@pytest.mark.parametrize("kind", ["llama", "opt", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["compressed", "dense"])
def test_sparse_kernel_model_equals_dense_with_zeros(tmp_path, kind, dtype, fmt):
    dense, folder, n_linears = _pruned_folder(tmp_path, kind, dtype, fmt)
    loaded = load_model(str(folder), dtype=str(dtype).removeprefix("torch."), device="cpu", sparse_kernel=True)
    model = loaded.model
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == n_linears - 1  # the unpruned first matrix stayed dense
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert not any(p.device.type == "meta" for p in model.parameters())
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(ids).logits.float()
        got = model(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the dense model rounds each layer's output to bf16
    assert _rel(got, ref) < tol


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_sparse_kernel_model_saves_same_compressed_tensors(tmp_path, kind):
    _, folder, _ = _pruned_folder(tmp_path, kind, torch.bfloat16 if kind == "opt" else torch.float32, "compressed")
    dtype = "bfloat16" if kind == "opt" else "float32"
    model = load_model(str(folder), dtype=dtype, device="cpu", sparse_kernel=True).model
    again = tmp_path / "again"
    again.mkdir()
    save_compressed(model, again)
    before, _ = load_compressed_state_dict(folder)
    after, _ = load_compressed_state_dict(again)
    assert set(before) == set(after)
    for key in before:
        assert same_bits(before[key], after[key]), key


def test_sparse_kernel_refuses_gpu_and_gguf(tmp_path):
    from wanda.errors import WandaError

    _, folder, _ = _pruned_folder(tmp_path, "llama", torch.float32, "dense")
    with pytest.raises(WandaError, match="float32 or bfloat16"):
        load_model(str(folder), dtype="float16", device="cpu", sparse_kernel=True)


def test_lora_adapter_on_sparse_kernel_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from wanda.jobs.evaluate import _attach_adapter

    dense, folder, _ = _pruned_folder(tmp_path, "llama", torch.float32, "compressed")
    torch.manual_seed(2)
    peft_model = get_peft_model(dense, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ids = torch.randint(0, 120, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = peft_model(ids).logits
    model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    attached = _attach_adapter(model, str(adapter))
    assert any(isinstance(m, SparseLinear) for m in attached.modules())  # the untargeted layers stay sparse
    with torch.no_grad():
        got = attached(ids).logits
    assert _rel(got, ref) < 1e-5


def test_load_rule_keeps_low_sparsity_and_small_matrices_dense(tmp_path, monkeypatch, caplog):
    import logging

    dense, folder, n_linears = _pruned_folder(tmp_path, "llama", torch.float32, "compressed")
    sizes = {n: m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    least = 2000  # between the k/v projections (24 x 48 = 1152 weights) and the others (>= 2304)
    small = {n for n, size in sizes.items() if size < least and n != "lm_head"}
    first = next(n for n in sizes if n != "lm_head")  # left unpruned by _pruned_folder: under 30% zeros
    assert len(small) == 4 and first not in small
    monkeypatch.setenv("WANDA_SPARSE_MIN_WEIGHTS", str(least))
    with caplog.at_level(logging.INFO, logger="wanda.models.loading"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    modules = dict(model.named_modules())
    for name in sizes:
        if name == "lm_head":
            continue
        want = nn.Linear if name in small or name == first else SparseLinear
        assert type(modules[name]) is want, name
    converted = n_linears - 1 - len(small)
    line = f"{converted} linear matrices sparse, {1 + len(small)} stayed dense (1 under 30% zeros, 4 under {least} weights)"
    assert line in caplog.text
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(model(ids).logits, dense(ids).logits) < 1e-5


def test_load_rule_default_threshold_keeps_tiny_model_dense(tmp_path, monkeypatch, caplog):
    import logging

    from wanda.kernels import MIN_WEIGHTS

    _, folder, n_linears = _pruned_folder(tmp_path, "llama", torch.float32, "dense")
    monkeypatch.delenv("WANDA_SPARSE_MIN_WEIGHTS")
    with caplog.at_level(logging.INFO, logger="wanda.models.loading"):
        model = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True).model
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert (
        f"0 linear matrices sparse, {n_linears} stayed dense (1 under 30% zeros, {n_linears - 1} under {MIN_WEIGHTS} weights)"
        in caplog.text
    )


def test_load_rule_refuses_bad_threshold(tmp_path, monkeypatch):
    from wanda.errors import WandaError

    _, folder, _ = _pruned_folder(tmp_path, "llama", torch.float32, "dense")
    monkeypatch.setenv("WANDA_SPARSE_MIN_WEIGHTS", "-3")
    with pytest.raises(WandaError, match="WANDA_SPARSE_MIN_WEIGHTS must be a whole number"):
        load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True)
