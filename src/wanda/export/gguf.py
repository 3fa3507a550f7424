"""Writing a pruned (and quantized) model as one GGUF file, llama.cpp's format, with the ``gguf`` library.

The decoder blocks' linear weights are written in a block type whose grid holds 0 exactly: Q8_0 (value q d,
q an int8) or Q4_0 (value (q - 8) d, q in 0..15), 32 weights of a row per block with one fp16 scale d. A
pruned weight is therefore written as the code of 0 and dequantizes to exactly 0.

Weights already on the type's grid (``--wbits`` with ``--gguf_type``: GPTQ ran on this very grid) are written
as they are: each block's fp16 scale and integer codes are recovered from its values, so that llama.cpp (and
``gguf.quants.dequantize``) gives back the model's weights bit for bit. A block that is not on the grid (no
``--wbits``) is rounded to nearest by ``gguf.quants.quantize``, the library's own rule, which maps 0 to the
code of 0 as well. Embeddings and the output head are written in F16, norms and biases in F32, as llama.cpp's
converter does for its quantized output types.

Tensor names come from ``gguf.TensorNameMap`` (llama.cpp's own table of Hugging Face names); llama's q and k
projections are permuted row-wise as llama.cpp's converter does (its rotary embedding pairs neighbouring rows),
which moves whole rows and so leaves every 32-weight block intact. The tokenizer is written with ``gguf.vocab``:
byte-level BPE (``gpt2``, as SmolLM2 and Qwen2 use) or a Llama SentencePiece vocabulary.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import WandaError

log = logging.getLogger(__name__)

__all__ = ["GGUF_FILE", "GGUF_TYPES", "GGUFReport", "encode_blocks", "save_gguf"]

#: The file's name inside the ``--save_model`` folder.
GGUF_FILE = "model.gguf"
#: ``--gguf_type`` choices: the block types whose grid holds zero exactly.
GGUF_TYPES = ("Q8_0", "Q4_0")
#: Integer codes c of the value c d, per type (Q4_0 stores c + 8).
_CODE_RANGE = {"Q8_0": (-128, 127), "Q4_0": (-8, 7)}
#: Hugging Face ``model_type`` -> llama.cpp architecture, and whether q/k are permuted for its rotary layout.
_ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


@dataclass
class GGUFReport:
    """What was written: the file, its type, and how many quantized blocks were already on the grid."""

    path: Path
    gguf_type: str
    file_bytes: int
    blocks: int
    blocks_on_grid: int


def _find_scales(blocks: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For float32 blocks (n, 32): (fp16 scales (n,), integer codes (n, 32), found (n,) bool) such that
    codes * float32(scale) == block exactly where found. A block on the grid has max|v| = k |d| for an integer
    k <= the largest |code|, so trying d = +-max|v| / k (exact in float32 when d is an fp16 value) finds it."""
    lo, hi = _CODE_RANGE[kind]
    n = blocks.shape[0]
    amax = np.abs(blocks).max(axis=1)
    scales = np.zeros(n, dtype=np.float16)
    codes = np.zeros(blocks.shape, dtype=np.int32)
    found = amax == 0  # a block of zeros: scale 0, codes of 0
    # most blocks use their largest code (gguf's own rule gives max|v| the code -8 or +-127): try those first
    ks = [-lo, hi] + [k for k in range(max(-lo, hi) - 1, 0, -1) if k not in (-lo, hi)]
    for k in ks:
        todo = np.flatnonzero(~found)
        if todo.size == 0:
            break
        for sign in (1.0, -1.0):
            if todo.size == 0:
                break
            b = blocks[todo]
            d16 = (np.float32(sign) * amax[todo] / np.float32(k)).astype(np.float16)
            d = d16.astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                c = np.rint(b / d)
            ok = np.isfinite(c).all(axis=1) & (c >= lo).all(axis=1) & (c <= hi).all(axis=1)
            ok &= (np.where(np.isfinite(c), c, 0).astype(np.float32) * d == b).all(axis=1)
            hit = todo[ok]
            scales[hit], codes[hit], found[hit] = d16[ok], c[ok].astype(np.int32), True
            todo = todo[~ok]
    return scales, codes, found


def encode_blocks(weight: np.ndarray, kind: str) -> tuple[np.ndarray, int, int]:
    """(the type's raw bytes (rows, cols / 32 * block bytes) uint8, blocks, blocks already on the grid) of a
    float32 matrix (rows, cols), cols divisible by 32. Blocks on the grid keep their values exactly; the
    others are quantized by ``gguf.quants.quantize``."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    rows, cols = weight.shape
    blocks = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1, 32)
    scales, codes, found = _find_scales(blocks, kind)
    if kind == "Q8_0":
        payload = codes.astype(np.int8).view(np.uint8)
    else:
        q = (codes + 8).astype(np.uint8)
        payload = q[:, :16] | (q[:, 16:] << np.uint8(4))
    raw = np.concatenate([scales.reshape(-1, 1).view(np.uint8), payload], axis=1)
    if not found.all():  # off the grid: the library's own round-to-nearest, block by block
        raw[~found] = quants.quantize(blocks[~found], qtype)
    return raw.reshape(rows, -1), blocks.shape[0], int(found.sum())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k (its converter's ``permute``): the inverse of transformers' reader."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = None
        for kind in (BpeVocab, LlamaHfVocab):
            try:
                vocab = kind(Path(tmp))
                break
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
        if vocab is None:
            raise WandaError(
                "--save_format gguf writes byte-level BPE or Llama SentencePiece tokenizers; this model's tokenizer "
                "is neither"
            )
        special = set()
        if (Path(tmp) / "tokenizer.json").exists():
            added = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
            special = {item["content"] for item in added if item.get("special")}
        tokens, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            token = text if isinstance(text, bytes) else str(text).encode("utf-8")
            tokens.append(token)
            scores.append(score)
            control = token.decode("utf-8", errors="replace") in special
            types.append(gguf.TokenType.CONTROL if control else ttype)
        for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer, as llama.cpp pads them
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens[:vocab_size])
        writer.add_token_types(types[:vocab_size])
        if vocab.tokenizer_model == "llama":
            writer.add_token_scores(scores[:vocab_size])
        gguf.SpecialVocab(tmp, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(
            writer, quiet=True
        )


def save_gguf(model: nn.Module, tokenizer, folder: str | Path, gguf_type: str) -> GGUFReport:
    """Write ``model`` (llama, mistral or qwen2) and ``tokenizer`` to ``folder``/``GGUF_FILE``."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise WandaError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise WandaError(f"--save_format gguf supports {', '.join(sorted(_ARCHS))} models; this one is {model_type!r}")
    if tokenizer is None:
        raise WandaError("--save_format gguf needs the model's tokenizer (llama.cpp reads it from the file)")
    arch_name, permute_qk = _ARCHS[model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    n_blocks = config.num_hidden_layers
    names = gguf.TensorNameMap(arch, n_blocks)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    qtype = gguf.GGMLQuantizationType[gguf_type]

    path = Path(folder) / GGUF_FILE
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(str(getattr(config, "_name_or_path", "") or model_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size)

    blocks = on_grid = 0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embedding as the output head when ``output.weight`` is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise WandaError(f"--save_format gguf: llama.cpp has no name for the tensor {hf_name}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        in_block = ".layers." in hf_name and data.ndim == 2
        if in_block and data.shape[1] % 32 == 0:
            raw, n, hit = encode_blocks(data, gguf_type)
            blocks, on_grid = blocks + n, on_grid + hit
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        elif data.ndim == 2:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = GGUFReport(path, gguf_type, path.stat().st_size, blocks, on_grid)
    log.info(
        "GGUF %s written to %s (%.1f MB); %d of %d blocks already on the grid, the rest rounded to nearest",
        gguf_type,
        path,
        report.file_bytes / 1e6,
        on_grid,
        blocks,
    )
    return report
