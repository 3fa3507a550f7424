"""What is checked about a model before any work is done with it.

A model folder is read as data, never as code: its ``config.json`` must be JSON naming an architecture the
installed ``transformers`` knows; a config that asks for the folder's own Python code (``auto_map``) is
refused unless the user passed ``--trust_remote_code``; pickled weights (``.bin``, ``.pt``), which can run
code when unpickled, are refused unless the user passed ``--allow_pickle``; every safetensors file must be
as long as its header says (a copy cut short fails here, not deep inside the loader); file names read from
the folder's own files must stay inside it. After loading, every weight must be finite.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from .checkpoint import INDEX_NAME, read_header, read_weight_map

__all__ = [
    "PICKLE_SUFFIXES",
    "inside",
    "read_json",
    "check_model_folder",
    "check_remote_code",
    "check_safetensors",
    "check_finite_weights",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
#: Elements per isfinite() call: the check's temporary is one bool per element, so it stays at 16 MB.
_FINITE_CHUNK = 1 << 24


def inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused if ``name`` (read from a file in ``folder``) points outside ``folder``."""
    try:
        path = (folder / str(name)).resolve()
    except (OSError, ValueError) as exc:  # e.g. an embedded NUL byte
        raise WandaError(f"{what} names {name!r}, which is not a usable file name ({exc})") from exc
    if not path.is_relative_to(folder.resolve()):
        raise WandaError(f"{what} names {name!r}, which is outside {folder}; refusing to read it")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or an error naming the file, the line and what is wrong."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise WandaError(f"{path} is not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise WandaError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise WandaError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def check_remote_code(config: dict, where: str, trust_remote_code: bool) -> None:
    """Refuse a config that asks for code shipped with the model unless the user trusts it."""
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        first = next(iter(auto_map.items())) if isinstance(auto_map, dict) else auto_map
        raise WandaError(
            f"{where} asks to run code shipped with the model (auto_map: {first}); nothing was run. "
            "Pass --trust_remote_code only if you trust its author"
        )


def _check_auto_map_files(folder: Path, auto_map, trust_remote_code: bool) -> None:
    """With --trust_remote_code: the modules named by ``auto_map`` must be files inside the folder."""
    if not trust_remote_code or not isinstance(auto_map, dict):
        return
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(reference, str) or "--" in reference:
                continue  # None (no such class) or a class in another hub repository, fetched by transformers
            module = reference.rsplit(".", 1)[0]  # transformers reads "module.Class" as the file module.py
            inside(folder, module + ".py", f"{folder / 'config.json'}: auto_map")


def check_safetensors(path: Path) -> None:
    """The file is a valid safetensors file as long as its header says (``read_header``: the one validated
    reader every mode uses). Reads only the header."""
    read_header(path)


def check_model_folder(
    folder: Path,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    need_weights: bool = True,
    need_tokenizer: bool = True,
) -> dict:
    """Check a ``from_pretrained`` folder before ``transformers`` reads it; returns its config."""
    from transformers import CONFIG_MAPPING

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WandaError(f"model folder {folder} has no config.json (expected a save_pretrained folder)")
    config = read_json(config_path)
    check_remote_code(config, str(config_path), trust_remote_code)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        check_remote_code(read_json(tokenizer_config), str(tokenizer_config), trust_remote_code)
    _check_auto_map_files(folder, config.get("auto_map"), trust_remote_code)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise WandaError(f"{config_path} has no model_type, so its architecture is unknown")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        import transformers

        raise WandaError(
            f"{config_path}: model_type {model_type!r} is not an architecture transformers "
            f"{transformers.__version__} knows; upgrade transformers or correct the config"
        )
    if need_weights:
        _check_weights(folder, allow_pickle)
    if need_tokenizer and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise WandaError(
            f"model folder {folder} has no tokenizer ({', '.join(_TOKENIZER_FILES[:3])}); save the "
            "tokenizer beside the weights (tokenizer.save_pretrained)"
        )
    return config


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    safetensors = sorted(folder.glob("*.safetensors"))
    if (folder / INDEX_NAME).is_file():
        safetensors = sorted({folder / name for name in read_weight_map(folder).values()})
    for path in safetensors:
        check_safetensors(path)
    if safetensors:
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise WandaError(f"model folder {folder} holds no weights (*.safetensors)")
    if not allow_pickle:
        raise WandaError(
            f"model folder {folder} holds only pickled weights ({', '.join(pickled[:3])}), which can "
            "run code when loaded; convert them to safetensors, or pass --allow_pickle if you trust "
            "their source"
        )


def check_finite_weights(model: nn.Module) -> None:
    """Every floating-point parameter is finite; else name each tensor holding NaN or Inf.

    One pass over the weights in chunks (a bool temporary of at most 16 MB), before any pruning work."""
    bad = []
    for name, tensor in model.named_parameters():
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK)):
            continue
        nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
        bad.append(f"{name} ({nan} NaN, {inf} Inf)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise WandaError(
            f"the model's weights are not finite: {', '.join(bad[:3])}{more}; the checkpoint is "
            "corrupt or was saved after a numeric overflow"
        )


def check_token_ids(windows: dict[str, torch.Tensor], config, tokenizer_name: str = "the tokenizer") -> None:
    """Refuse windows holding a token id the embedding has no row for (a tokenizer from another model, or added
    tokens the embedding was never resized for): the first forward pass would fail with an index error deep in
    the model, or on a GPU with a device-side assert, after the model has loaded."""
    rows = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if not isinstance(rows, int):
        return
    for name, ids in windows.items():
        if ids.numel() and int(ids.max()) >= rows:
            raise WandaError(
                f"{name}: {tokenizer_name} gives token id {int(ids.max())}, but the model's embedding has "
                f"{rows} rows (vocab_size): the tokenizer does not belong to this model"
            )
