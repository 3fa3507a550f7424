"""``--save_format gguf``: llama.cpp's Q8_0 / Q4_0 file, read back by the ``gguf`` library and by transformers,
gives back the weights we computed bit for bit, and every pruned weight is exactly 0 after dequantization."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, calib_ids, env, one_thread, tiny_model, word_corpus  # noqa: F401

from wanda.export import save_model
from wanda.export.gguf import GGUF_FILE, _permute, encode_blocks
from wanda.pruning.prune import prune
from wanda.pruning.prune_settings import PruneSettings
from wanda.quant.grid import GGUFGrid
from wanda.quant.settings import QuantSettings

gguf = pytest.importorskip("gguf")

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

KINDS = ["Q8_0", "Q4_0"]
BITS = {"Q8_0": 8, "Q4_0": 4}


def _bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind SmolLM2 has) of VOCAB tokens: three specials, then byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())[: VOCAB - 3]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *symbols])}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _dequantized(reader) -> dict[str, np.ndarray]:
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }


def _file_weight(model, hf_name: str) -> np.ndarray:
    """The model's weight in the file's row order (q and k permuted as llama.cpp's converter does)."""
    w = model.state_dict()[hf_name].float().numpy()
    if "q_proj" in hf_name:
        return _permute(w, model.config.num_attention_heads)
    if "k_proj" in hf_name:
        return _permute(w, model.config.num_key_value_heads)
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_encode_blocks_keeps_grid_values_and_rounds_the_rest_like_gguf(kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 96, generator=g) * torch.logspace(-3, 1, 16).unsqueeze(1)
    w[torch.rand(w.shape, generator=g) < 0.5] = 0
    qtype = gguf.GGMLQuantizationType[kind]
    grid = GGUFGrid(kind)
    # on the grid (gguf's own round-to-nearest, and codes moved off the largest one as GPTQ's can be)
    on = grid.quantize(w)
    params = grid.fit(w[:, :32])
    shrunk = grid.decode(grid.encode(w[:, :32] * 0.6, params), params)  # same scale, smaller codes
    on[:, :32] = shrunk
    raw, blocks, hit = encode_blocks(on.numpy(), kind)
    assert (blocks, hit) == (16 * 3, 16 * 3)
    back = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(back, on.numpy())
    # a pruned weight is 0 (Q4_0 with a negative scale decodes the code of 0 as -0.0, in gguf and llama.cpp alike)
    assert (back[w.numpy() == 0] == 0).all()
    # off the grid: exactly the library's round-to-nearest (which our grid reproduces)
    raw, blocks, hit = encode_blocks(w.numpy(), kind)
    assert hit == int((w.reshape(-1, 32).abs().amax(1) == 0).sum())
    assert np.array_equal(raw, gguf.quants.quantize(w.numpy(), qtype))
    assert np.array_equal(gguf.quants.dequantize(raw, qtype), grid.quantize(w).numpy())


def _pruned(kind: str, method: str, pattern: str, wbits: bool):
    model = tiny_model("llama")
    settings = PruneSettings(prune_method=method, sparsity_type=pattern, sparsity_ratio=0.5)
    quant = QuantSettings(wbits=BITS[kind], groupsize=32, sym=True, gguf_type=kind) if wbits else None
    masks = {}
    prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    for name, tensor in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            masks[name] = tensor == 0
    return model, masks


@pytest.mark.parametrize(("method", "pattern"), [("wanda", "unstructured"), ("sparsegpt", "2:4")])
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_file_gives_back_our_weights(tmp_path, kind, method, pattern):
    from transformers import AutoModelForCausalLM

    model, masks = _pruned(kind, method, pattern, wbits=True)
    out = tmp_path / "gguf"
    saved = save_model(model, _bpe_tokenizer(), out, "gguf", gguf_type=kind)
    assert saved.save_format == "gguf" and (out / GGUF_FILE).is_file()
    reader = gguf.GGUFReader(out / GGUF_FILE)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    values = _dequantized(reader)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for hf_name, pruned in masks.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert types[name] == kind, name
        ours = _file_weight(model, hf_name)
        # bit for bit: GPTQ ran on the file's grid
        assert np.array_equal(values[name], ours), name
        zero = ours == 0
        assert zero.mean() >= 0.5 and (values[name][zero] == 0).all(), name
    assert len(masks) == 14
    # metadata llama.cpp needs, and the tokenizer
    fields = reader.fields
    for key in (
        "general.architecture",
        "general.file_type",
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.dimension_count",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ):
        assert key in fields, key
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == VOCAB
    assert int(fields["tokenizer.ggml.bos_token_id"].parts[-1][0]) == 1
    # transformers reads the file back (dequantizing with the gguf library, undoing the q/k permutation)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_FILE, dtype=torch.float32).state_dict()
    for hf_name in masks:
        assert torch.equal(loaded[hf_name], model.state_dict()[hf_name]), hf_name
    emb = model.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(loaded["model.embed_tokens.weight"], emb.half().float())  # F16, as llama.cpp writes it


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_without_wbits_rounds_to_nearest_keeping_zeros(tmp_path, kind):
    model, masks = _pruned(kind, "wanda", "unstructured", wbits=False)
    save_model(model, _bpe_tokenizer(), tmp_path / "rtn", "gguf", gguf_type=kind)
    values = _dequantized(gguf.GGUFReader(tmp_path / "rtn" / GGUF_FILE))
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    for hf_name in masks:
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        ours = _file_weight(model, hf_name)
        assert np.array_equal(values[name], GGUFGrid(kind).quantize(torch.from_numpy(ours)).numpy()), name
        assert (values[name][ours == 0] == 0).all(), name


def _bpe_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-bpe"
    tiny_model("llama").save_pretrained(folder)
    _bpe_tokenizer().save_pretrained(folder)
    return folder


def test_cli_writes_gguf_with_gptq_on_its_grid(tmp_path, env):  # noqa: F811
    folder = _bpe_folder(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(sorted(set("abcdefghijklmnopqrstuvwxyz"))) * 200 + "\n")
    out = tmp_path / "out"
    args = [
        *("--model", str(folder), "--calib_dataset", str(corpus), "--eval_dataset", str(corpus)),
        *("--seqlen", "32", "--nsamples", "4", "--eval_windows", "1", "--device", "cpu"),
        *("--prune_method", "wanda", "--sparsity_ratio", "0.5", "--wbits", "4", "--groupsize", "32", "--sym"),
        *("--gguf_type", "Q4_0", "--save_format", "gguf", "--save_model", str(out)),
    ]
    proc = subprocess.run([sys.executable, "-m", "wanda", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = gguf.GGUFReader(out / GGUF_FILE)
    quantized = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0]
    assert len(quantized) == 14
    for t in quantized:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert (values == 0).mean() >= 0.5, t.name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--save_format", "gguf", "--save_model", "x"], "--save_format gguf and --gguf_type go together"),
        (["--gguf_type", "Q4_0"], "--save_format gguf and --gguf_type go together"),
        (["--gguf_type", "Q4_0", "--wbits", "8", "--groupsize", "32", "--sym"], "pass --wbits 4 --groupsize 32"),
        (["--gguf_type", "Q8_0", "--wbits", "8"], "pass --wbits 8 --groupsize 32 --sym"),
        (["--gguf_type", "Q5_1"], "invalid choice: 'Q5_1'"),
    ],
)
def test_bad_gguf_flags_exit_2(flags, message, env):  # noqa: F811
    proc = subprocess.run([sys.executable, "-m", "wanda", *flags], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("wanda: error: ") and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
