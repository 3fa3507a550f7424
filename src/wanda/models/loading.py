"""Loading a causal LM and its tokenizer from a hub id, a local folder, a ``.gguf`` file or a named model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from ..utils.declare import SettingsMixin, require, setting
from ..utils.devices import resolve_device, resolve_dtype
from ..utils.resources import release_memory
from .bundled import BUNDLED_NAME, NAMED_MODELS, bundled_model_dir
from .checkpoint import Checkpoint, is_streamable
from .checks import check_finite_weights, check_model_folder, check_remote_code
from .ct_read import ct_config
from .sparse_load import SPARSE_VALUES

log = logging.getLogger(__name__)

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass(frozen=True, kw_only=True)  # keyword-only: subclasses may declare fields without defaults
class TrustSettings(SettingsMixin):
    """What loading a model may do beyond reading data; every command that loads a model has these flags."""

    trust_remote_code: bool = setting(
        False,
        "run Python code shipped with the model (its config's auto_map); "
        "without it such a model is refused and nothing from it runs",
    )
    allow_pickle: bool = setting(
        False,
        "load pickled weights (.bin, .pt), which can run code when unpickled; without it only safetensors are read",
    )


@dataclass(frozen=True)
class SparseKernelSettings(SettingsMixin):
    """Whether a command that runs a model runs its pruned linears on the sparse CPU kernel."""

    sparse_kernel: bool = setting(
        False,
        "build the model with SparseLinear layers (non-zeros + bitmask, wanda.kernels) straight from a "
        "compressed or dense-with-zeros folder, tensor by tensor; matrices with under 30 percent zeros or under "
        "262144 weights stay dense, where the sparse form does not decode faster (CPU only)",
    )
    sparse_values: str = setting(
        "auto",
        "values of the --sparse_kernel layers: int8 (a quantized folder's codes and scales as they are: "
        "--save_format compressed-tensors), float (the --dtype weights) or auto (int8 when the folder is quantized)",
        choices=SPARSE_VALUES,
    )

    def __post_init__(self) -> None:
        require(
            self.sparse_values in SPARSE_VALUES,
            f"--sparse_values must be one of {', '.join(SPARSE_VALUES)}, got {self.sparse_values!r}",
        )
        require(
            self.sparse_kernel or self.sparse_values == "auto",
            f"--sparse_values {self.sparse_values} sets the values of the sparse kernel's layers: pass --sparse_kernel",
        )


@dataclass(frozen=True)
class ModelSettings(TrustSettings):
    """Which model to load, where it runs, and (``TrustSettings``) what loading it may do beyond reading data."""

    model: str | None = setting(
        None,
        "hub id, local from_pretrained folder, .gguf file, or a named model that "
        f"installs offline: {', '.join(NAMED_MODELS)} (default: {BUNDLED_NAME})",
    )
    cache_dir: str = setting("llm_weights", "where hub weights are downloaded")
    device: str = setting(
        "auto", "cpu, cuda, cuda:N (auto: cuda if available); each block is moved there while it is processed"
    )
    dtype: str = setting(
        "auto",
        "auto (fp32 on CPU, bf16/fp16 on GPU; full fine-tuning trains fp32 weights under "
        "autocast), float32, float16, bfloat16",
    )

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

    def load(self, dtype: str | None = None, sparse_kernel: bool = False, sparse_values: str = "auto") -> "LoadedModel":
        return load_model(
            self.model,
            self.cache_dir,
            dtype or self.dtype,
            self.device,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            sparse_kernel=sparse_kernel,
            sparse_values=sparse_values,
        )


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str


def default_seqlen(model: nn.Module, cap: int = 2048) -> int:
    """The smaller of the model's context length and ``cap`` (never a 32k-128k buffer)."""
    context = context_length(model)
    return min(context[0], cap) if context is not None else cap


def context_length(model: nn.Module) -> tuple[int, str] | None:
    """The model's context in tokens and the config key that says so, or ``None`` if its config has none."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def check_seqlen(model: nn.Module, seqlen: int) -> None:
    """Refuse windows longer than the model's context (positions past it are untrained or out of range)."""
    context = context_length(model)
    if context is not None and seqlen > context[0]:
        raise WandaError(
            f"--seqlen {seqlen} is beyond the model's context of {context[0]} tokens "
            f"({context[1]} in its config); use --seqlen {context[0]} or less"
        )


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).exists()


def load_model(
    name: str | None,
    cache_dir: str | None = "llm_weights",
    dtype: str | None = "auto",
    device: str | None = "auto",
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    sparse_kernel: bool = False,
    min_sparsity: float = 0.3,
    min_weights: int | None = None,
    sparse_values: str = "auto",
) -> LoadedModel:
    """Load ``name`` (hub id, folder, ``.gguf`` file, or a named model: ``smollm2-135m``, ``gemma3-270m``) on
    CPU, or across GPUs on CUDA.

    A local folder is checked before ``transformers`` reads it (``wanda.models.checks``): code it ships runs
    only with ``trust_remote_code``, pickled weights load only with ``allow_pickle``, and truncated weights,
    a broken config or a missing tokenizer are refused with one line. Every loaded weight must be finite.

    ``sparse_kernel``: build the model on the CPU with ``SparseLinear`` layers straight from the folder, one
    tensor at a time (``wanda.models.sparse_load``), so no dense copy of the model exists; linears with fewer
    than ``min_sparsity`` zeros or fewer than ``min_weights`` weights (None: ``wanda.kernels.min_weights()``,
    262144 unless ``$WANDA_SPARSE_MIN_WEIGHTS`` says otherwise) stay dense, and the load line says how many and why.
    ``sparse_values``: auto (int8 codes for a compressed-tensors pack-quantized folder), float or int8.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name is not None and not name.strip():  # "" is not "no --model": never load the bundled model for it
        raise WandaError(
            f"--model is empty; give a hub id, a folder or a .gguf file (or leave it out for {BUNDLED_NAME})"
        )
    name = name or BUNDLED_NAME
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    kwargs: dict = {"dtype": torch_dtype, "low_cpu_mem_usage": True, "trust_remote_code": trust_remote_code}
    if not allow_pickle:
        kwargs["use_safetensors"] = True  # transformers then never falls back to pytorch_model.bin
    if target.type == "cuda":
        # accelerate places the model on one GPU when it fits, across GPUs (then CPU) when it does not
        kwargs["device_map"] = "auto" if target.index is None else {"": target.index}
    tok_kwargs: dict = {"trust_remote_code": trust_remote_code}
    compressed = False
    if name in NAMED_MODELS:
        location = str(bundled_model_dir(name))
    elif _looks_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise WandaError(f"model path {path} does not exist")
        compressed = (path / "wanda_compressed.json").is_file()  # a compact sparse checkpoint
        if path.suffix == ".gguf":
            location = str(path.parent)
            kwargs["gguf_file"] = tok_kwargs["gguf_file"] = path.name
            kwargs.pop("use_safetensors", None)
        elif not path.is_dir():
            raise WandaError(f"model path {path} is a file; give a save_pretrained folder or a .gguf file")
        else:
            check_model_folder(
                path, trust_remote_code, allow_pickle, need_weights=not compressed, need_tokenizer=not compressed
            )
            # the streamed path's checks, before anything loads; the sparse kernel reads a compressed-tensors
            # folder's packed tensors itself (the model's ``weight`` of each quantized linear is not stored)
            packed = sparse_kernel and ct_config(path) is not None
            if not compressed and not packed and is_streamable(path):
                from .streaming import check_matches_config, meta_model, under_model_names

                raw = Checkpoint.open(path)
                skeleton = meta_model(path, torch_dtype, trust_remote_code)
                check_matches_config(skeleton, raw, under_model_names(skeleton, raw), path)
                del skeleton
            location = str(path)
    else:
        location = name
        kwargs["cache_dir"] = tok_kwargs["cache_dir"] = cache_dir
    if sparse_kernel:
        if target.type != "cpu":
            raise WandaError("--sparse_kernel runs on the CPU; use --device cpu")
        if "gguf_file" in kwargs or not Path(location).is_dir():
            raise WandaError(f"--sparse_kernel needs a local safetensors or compressed folder, not {name!r}")
    try:
        if sparse_kernel:
            from .sparse_load import load_sparse_model

            model, report = load_sparse_model(location, torch_dtype, min_sparsity, min_weights, sparse_values)
            tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
            log.info("sparse kernel: %s", report.line())
        elif compressed:
            from .compressed import load_compressed

            model, tokenizer = load_compressed(location, dtype=torch_dtype, device=target)
        else:
            if location == name:  # a hub id: its config decides whether it asks for code, before the weights
                config = AutoConfig.from_pretrained(location, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
                check_remote_code({"auto_map": getattr(config, "auto_map", None)}, name, trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    except WandaError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers, tokenizers and safetensors raise any type for a
        # malformed file (AttributeError for a tokenizer.json of the wrong shape, huggingface_hub's validation
        # errors for an inconsistent config.json, SafetensorError, UnpicklingError, ...): one line, not a traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WandaError(f"could not load model {name!r}: {type(exc).__name__}: {message}") from exc
    check_finite_weights(model)
    model.eval()
    model.config.use_cache = False
    release_memory()  # the loader's freed buffers
    log.info("loaded %s%s (%s, %s)", "compressed " if compressed else "", name, type(model).__name__, torch_dtype)
    return LoadedModel(model, tokenizer, location)
