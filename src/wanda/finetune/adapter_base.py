"""An adapter fits the base it was trained on, and no other: checked before it is loaded, merged or resumed.

peft loads an adapter onto any model whose module names it finds: modules it does not find are skipped with
a warning, and a width that differs fails deep inside ``load_state_dict``. Merged onto another pruned model of
the same shape, an adapter gives a model that runs and is wrong. So before an adapter is used, two things are
compared, each a one-line refusal:

* the base recorded in ``adapter_config.json`` (``base_model_name_or_path``) with the model given: the same
  name, or two names of one folder (after ``~``, relative parts and symlinks resolve). A different name is
  refused even when the shapes match (a copy of the base elsewhere counts as another base: its weights may
  have been pruned or trained since); an adapter that records no base skips this check;
* every ``lora_A`` / ``lora_B`` tensor's shape with the module it adapts: the module must exist in the base and
  take (``lora_A``) and give (``lora_B``) as many features.

``attach_lora`` records a local base as its absolute path, so that the check holds from any working folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from ..errors import WandaError

__all__ = ["ADAPTER_CONFIG", "recorded_base", "same_base", "check_adapter_base", "base_name"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def base_name(name: str | None) -> str | None:
    """How an adapter records its base: a local folder as its absolute path, anything else as given."""
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def same_base(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    return a.is_dir() and b.is_dir() and a.resolve() == b.resolve()


def recorded_base(adapter_dir: str | Path) -> str | None:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WandaError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict):
        raise WandaError(f"{path} is not an adapter config (a JSON object)")
    return config.get("base_model_name_or_path") or None


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        return {}  # a pickled adapter_model.bin: peft's own loading reports what does not fit
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WandaError(f"cannot read the adapter weights {path}: {str(exc).splitlines()[0]}") from exc


def check_adapter_base(adapter_dir: str | Path, model: nn.Module, given: str | None = None) -> None:
    """Refuse, with one line, an adapter trained on another base than ``model`` (named ``given``, by default
    the name it was loaded from)."""
    adapter_dir = Path(adapter_dir).expanduser()
    given = given or getattr(model, "name_or_path", None) or None
    recorded = recorded_base(adapter_dir)
    if recorded and given and not same_base(recorded, given):
        raise WandaError(
            f"the adapter {adapter_dir} was trained on {recorded}, not on --model {given}: an adapter fits only "
            "its own base; pass that base (a copy elsewhere counts as another base)"
        )
    for key, shape in _adapter_shapes(adapter_dir).items():
        match = _KEY.match(key)
        if match is None:
            continue
        name, part = match.group("module"), match.group("part")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise WandaError(
                f"the adapter {adapter_dir} does not fit --model {given or 'given'}: it adapts {name}, which the "
                "base does not have"
            ) from None
        if not isinstance(module, nn.Linear) or len(shape) != 2:
            continue
        axis, features, what = (
            (1, module.in_features, "inputs") if part == "lora_A" else (0, module.out_features, "outputs")
        )
        if shape[axis] != features:
            raise WandaError(
                f"the adapter {adapter_dir} does not fit --model {given or 'given'}: its {part} of {name} has "
                f"{shape[axis]} {what}, the base's {name} {features}"
            )
