"""Loading a causal LM and its tokenizer from a hub id, a local folder, a ``.gguf`` file or a named model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..errors import WandaError
from ..resources import release_memory
from ..settings import SettingsMixin, setting
from .bundled import BUNDLED_NAME, NAMED_MODELS, bundled_model_dir

log = logging.getLogger(__name__)

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass(frozen=True)
class ModelSettings(SettingsMixin):
    """Which model to load and where it runs."""

    model: str | None = setting(None, "hub id, local from_pretrained folder, .gguf file, or a named model that "
                                f"installs offline: {', '.join(NAMED_MODELS)} (default: {BUNDLED_NAME})")
    cache_dir: str = setting("llm_weights", "where hub weights are downloaded")
    device: str = setting("auto", "cpu, cuda, cuda:N (auto: cuda if available); each block is moved there while "
                          "it is processed")
    dtype: str = setting("auto", "auto (fp32 on CPU, bf16/fp16 on GPU; full fine-tuning trains fp32 weights under "
                         "autocast), float32, float16, bfloat16")

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, torch.device("cpu"))  # a bad name fails here, before anything loads
        resolve_device(self.device)

    @property
    def name(self) -> str:
        return self.model or BUNDLED_NAME

    @property
    def bundled(self) -> bool:
        """A named offline model (its defaults: offline calibration and evaluation text)."""
        return self.name in NAMED_MODELS

    def load(self, dtype: str | None = None) -> "LoadedModel":
        return load_model(self.model, self.cache_dir, dtype or self.dtype, self.device)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str


def default_seqlen(model: nn.Module, cap: int = 2048) -> int:
    """The smaller of the model's context length and ``cap`` (never a 32k-128k buffer)."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).exists()


def load_model(name: str | None, cache_dir: str | None = "llm_weights", dtype: str | None = "auto",
               device: str | None = "auto") -> LoadedModel:
    """Load ``name`` (hub id, folder, ``.gguf`` file, or a named model: ``smollm2-135m``, ``gemma3-270m``) on
    CPU, or across GPUs on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or BUNDLED_NAME
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    kwargs: dict = {"dtype": torch_dtype, "low_cpu_mem_usage": True}
    if target.type == "cuda":
        # accelerate places the model on one GPU when it fits, across GPUs (then CPU) when it does not
        kwargs["device_map"] = "auto" if target.index is None else {"": target.index}
    tok_kwargs: dict = {}
    if name in NAMED_MODELS:
        location = str(bundled_model_dir(name))
    elif _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise WandaError(f"model path {path} does not exist")
        if (path / "wanda_compressed.json").is_file():  # a compact sparse checkpoint (wanda.export.compressed)
            from ..export.compressed import load_compressed

            model, tokenizer = load_compressed(path, dtype=torch_dtype, device=target)
            model.config.use_cache = False
            log.info("loaded compressed %s (%s, %s)", name, type(model).__name__, torch_dtype)
            return LoadedModel(model, tokenizer, str(path))
        if path.suffix == ".gguf":
            location = str(path.parent)
            kwargs["gguf_file"] = tok_kwargs["gguf_file"] = path.name
        elif not (path / "config.json").is_file():
            raise WandaError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        else:
            location = str(path)
    else:
        location = name
        kwargs["cache_dir"] = tok_kwargs["cache_dir"] = cache_dir
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise WandaError(f"could not load model {name!r}: {exc}".splitlines()[0]) from exc
    model.eval()
    model.config.use_cache = False
    release_memory()  # the loader's freed buffers
    log.info("loaded %s (%s, %s)", name, type(model).__name__, torch_dtype)
    return LoadedModel(model, tokenizer, location)
