"""Image classifiers by name: ConvNeXt, DeiT and ViT from ``transformers`` (always) or ``timm`` (optional).

``--model`` takes the original code's timm names (``convnext_base``, ``deit_base_patch16_224``,
``vit_large_patch16_224`` and the other sizes of the same families). With timm importable (it needs
torchvision) the name goes to ``timm.create_model``, the original code's choice. Otherwise the name picks a
``transformers`` architecture and config from the registry below, whose weights come from ``--resume`` (a
state dict in transformers' keys, or one of the original code's official ConvNeXt / timm ViT and DeiT checkpoints, which
``convert`` renames) or from the matching hub checkpoint.
``--resume`` may also be a ``from_pretrained`` folder of any transformers image classifier; then ``--model`` is
only a label.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import WandaError
from .convert import CONFIG_OVERRIDES, checkpoint_format, to_transformers
from .data import Preprocess

__all__ = [
    "ModelSpec",
    "named_spec",
    "LoadedClassifier",
    "load_classifier",
    "read_state_dict",
    "timm_available",
    "LIBRARIES",
]

log = logging.getLogger(__name__)

LIBRARIES = ("auto", "transformers", "timm")
PREPROCESSOR_FILE = "preprocessor_config.json"

# Each evaluation transform as published with the weights the hub id names (the original code's checkpoints use the
# same numbers: 224 / 0.875 = 256 then a 224 crop, bicubic).
_CONVNEXT_PRE = dict(crop_pct=0.875, interpolation="bicubic")
_DEIT_PRE = dict(crop_pct=0.875, interpolation="bicubic")
_VIT_PRE = dict(crop_pct=0.9, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# name -> (depths, widths); ConvNeXt (Liu et al. 2022, Table 9)
_CONVNEXT = {
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# name -> (width, depth, heads); ViT (Dosovitskiy et al. 2021, Table 1) and DeiT's tiny/small
_VIT = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


@dataclass(frozen=True)
class ModelSpec:
    """A named transformers architecture: how to build it, where its weights live, how to preprocess."""

    name: str
    build: Callable[..., nn.Module]  # (num_labels, **config overrides) -> randomly initialised model
    hub_id: str
    preprocess: Preprocess


def named_spec(name: str) -> ModelSpec:
    """The registry: ``convnext_{size}``, ``deit_{size}[_distilled]_patch16_{res}``, ``vit_{size}_patch{p}_{res}``."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    if match := re.fullmatch(r"convnext_(tiny|small|base|large|xlarge)(?:_(\d+))?", name):
        size, res = match[1], int(match[2] or 224)
        depths, widths = _CONVNEXT[size]
        config = dict(depths=list(depths), hidden_sizes=list(widths), image_size=res)
        hub = f"facebook/convnext-{size}-{res}" + ("-22k-1k" if size == "xlarge" else "")
        pre = Preprocess.center_crop_pct(res, **_CONVNEXT_PRE)
        return ModelSpec(
            name, lambda n, **kw: ConvNextForImageClassification(ConvNextConfig(num_labels=n, **config, **kw)), hub, pre
        )
    if match := re.fullmatch(r"(deit|vit)_(tiny|small|base|large|huge)(_distilled)?_patch(\d+)_(\d+)", name):
        family, size, distilled, patch, res = match[1], match[2], bool(match[3]), int(match[4]), int(match[5])
        if family == "vit" and distilled:
            raise WandaError(f"unknown model {name!r}: only DeiT has distilled variants")
        width, depth, heads = _VIT[size]
        config = dict(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            patch_size=patch,
            image_size=res,
        )
        pre = Preprocess.center_crop_pct(res, **(_DEIT_PRE if family == "deit" else _VIT_PRE))
        if family == "deit":
            hub = f"facebook/deit-{size}{'-distilled' if distilled else ''}-patch{patch}-{res}"
            if distilled:  # two heads (class and distillation token), averaged at inference
                return ModelSpec(
                    name,
                    lambda n, **kw: DeiTForImageClassificationWithTeacher(DeiTConfig(num_labels=n, **config, **kw)),
                    hub,
                    pre,
                )
            # DeiT without distillation is a ViT with another training recipe (its hub checkpoints are ViTs)
            return ModelSpec(
                name, lambda n, **kw: ViTForImageClassification(ViTConfig(num_labels=n, **config, **kw)), hub, pre
            )
        hub = f"google/vit-{size}-patch{patch}-{res}"
        return ModelSpec(
            name, lambda n, **kw: ViTForImageClassification(ViTConfig(num_labels=n, **config, **kw)), hub, pre
        )
    raise WandaError(
        f"unknown model {name!r}: use convnext_{{tiny,small,base,large,xlarge}}, deit_{{tiny,small,base}}_patch16_224 "
        "(optionally _distilled_), vit_{tiny,small,base,large,huge}_patch{16,32}_224 (or _384), or pass "
        "--resume a transformers from_pretrained folder"
    )


def timm_available() -> bool:
    """timm imports only beside a torchvision that matches torch; an install that fails to import counts as
    absent (with a warning, since ``--library auto`` then falls back to transformers)."""
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        importlib.import_module("timm")
    except ImportError as exc:  # typically its torchvision is missing or built for another torch
        log.warning("timm is installed but does not import (%s); using transformers", exc)
        return False
    return True


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file; unwraps the original code's ``{"model": ...}`` and DDP's
    ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise WandaError(f"--resume {path} does not exist (give a checkpoint file or a from_pretrained folder)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses arbitrary objects, which could run code
        raise WandaError(
            f"{path} holds more than tensors (e.g. an optimizer or args); if you trust it, save its "
            "state dict alone: torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')"
        ) from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WandaError(f"{path} is not a state dict (a mapping of names to tensors, or one under 'model')")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class LoadedClassifier:
    """A model, its library, its preprocessing, and how to call and save it."""

    model: nn.Module
    library: str
    name: str
    preprocess: Preprocess
    #: transformers' preprocessor config of the source folder, copied verbatim when saving
    processor_config: dict | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        if self.library == "transformers":
            return int(self.model.config.num_labels)
        return int(self.model.num_classes)

    def forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> logits (batch, classes); a DeiT with two heads returns their average."""
        if self.library == "transformers":
            return model(pixel_values=images).logits
        return model(images)

    def save(self, folder: Path, extra: dict) -> None:
        """Write the (pruned) weights into ``folder`` (a temporary folder that the caller renames into place)."""
        if self.library == "transformers":
            self.model.save_pretrained(folder)
            processor = self.processor_config or self.preprocess.to_image_processor()
            (folder / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
        else:  # the original code's checkpoint format, which ``--resume`` reads back
            torch.save({"model": self.model.state_dict(), "model_name": self.name}, folder / "checkpoint.pth")
        (folder / "wanda_vision.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")


def _load_transformers_folder(folder: Path, name: str) -> LoadedClassifier:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
    processor = None
    if (folder / PREPROCESSOR_FILE).is_file():
        processor = json.loads((folder / PREPROCESSOR_FILE).read_text())
        preprocess = Preprocess.from_image_processor(processor)
    else:  # the family's published transform at the model's own input size
        family = {"convnext": _CONVNEXT_PRE, "convnextv2": _CONVNEXT_PRE, "deit": _DEIT_PRE, "vit": _VIT_PRE}.get(
            model.config.model_type, _CONVNEXT_PRE
        )
        preprocess = Preprocess.center_crop_pct(int(getattr(model.config, "image_size", 224)), **family)
        log.warning("%s has no %s; using %s", folder, PREPROCESSOR_FILE, preprocess)
    return LoadedClassifier(model, "transformers", name, preprocess, processor)


def _load_transformers_named(name: str, resume: str | None, num_classes: int | None) -> LoadedClassifier:
    spec = named_spec(name)
    if resume is None:
        from transformers import AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(spec.hub_id, dtype=torch.float32)
            from transformers.utils import cached_file

            processor_file = cached_file(spec.hub_id, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
        except OSError as exc:
            raise WandaError(
                f"cannot load {spec.hub_id} (the transformers checkpoint for {name}); without network "
                "access pass --resume a local checkpoint or from_pretrained folder"
            ) from exc
        if processor_file is None:
            return LoadedClassifier(model, "transformers", name, spec.preprocess)
        processor = json.loads(Path(processor_file).read_text())
        return LoadedClassifier(model, "transformers", name, Preprocess.from_image_processor(processor), processor)
    state = read_state_dict(resume)
    fmt = checkpoint_format(state)
    model = spec.build(num_classes or 1000, **({} if fmt == "transformers" else CONFIG_OVERRIDES))
    state = to_transformers(state, model)
    if fmt != "transformers":
        log.info("converted a %s checkpoint to transformers' %s", fmt, type(model).__name__)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        hint = "check --model (its size and patch) and the number of class folders in train/"
        raise WandaError(
            f"--resume {resume} does not fit transformers' {type(model).__name__} for {name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} of another shape (e.g. {mismatched[:3]}); "
            f"{hint}"
        )
    model.load_state_dict(state)
    return LoadedClassifier(model.float(), "transformers", name, spec.preprocess)


def _load_timm(name: str, resume: str | None, num_classes: int | None) -> LoadedClassifier:
    import timm

    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = timm.create_model(name, pretrained=resume is None, **kwargs)
    if resume is not None:
        model.load_state_dict(read_state_dict(resume))
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    preprocess = Preprocess.center_crop_pct(
        size,
        cfg.get("crop_pct", 0.875),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    return LoadedClassifier(model.float(), "timm", name, preprocess)


def load_classifier(
    name: str, resume: str | None = None, library: str = "auto", num_classes: int | None = None
) -> LoadedClassifier:
    """Load ``name`` (see the module docstring) on the CPU in fp32, in eval mode.

    ``num_classes``: the number of classes of a model built from its name (default: 1000).
    """
    if library not in LIBRARIES:
        raise WandaError(f"--library must be one of {', '.join(LIBRARIES)}; got {library!r}")
    folder = Path(resume) if resume is not None else None
    if folder is not None and folder.is_dir():
        if not (folder / "config.json").is_file():
            raise WandaError(
                f"--resume {folder} is a folder without config.json; give a transformers "
                "from_pretrained folder or a checkpoint file"
            )
        if library == "timm":
            raise WandaError("--library timm takes a checkpoint file in --resume, not a transformers folder")
        loaded = _load_transformers_folder(folder, name)
    elif library == "timm" or (library == "auto" and timm_available()):
        if library == "timm" and not timm_available():
            raise WandaError(
                "--library timm needs timm, which needs a torchvision matching torch; install both "
                "(pip install 'wanda[vision]' timm) or use --library transformers"
            )
        loaded = _load_timm(name, resume, num_classes)
    else:
        loaded = _load_transformers_named(name, resume, num_classes)
    loaded.model.eval()
    return loaded
