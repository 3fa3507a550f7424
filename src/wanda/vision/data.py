"""ImageNet-style folders and each model's evaluation preprocessing, with PIL and torch only (no torchvision).

A folder tree ``ROOT/{train,val}/CLASS/IMAGE`` as torchvision's ``ImageFolder`` reads it: the classes are the
sub-folders of ``train/`` in sorted order (ImageNet's synset folders sort into the standard class indices), and
``val/`` is labelled with the same indices.

Preprocessing is the usual evaluation transform: resize (keeping the aspect ratio when ``resize`` is one
number, its shorter side; or to an exact size), center-crop, scale to [0, 1], normalise per channel.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import WandaError

__all__ = [
    "Preprocess",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "calibration_batches",
    "loader",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """``resize``: shorter side (int) or exact (height, width); ``crop``: center crop (height, width) or None."""

    resize: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise WandaError(f"unknown interpolation {self.interpolation!r}; choose from {', '.join(_RESAMPLE)}")

    @classmethod
    def center_crop_pct(cls, size: int, crop_pct: float, **kwargs) -> "Preprocess":
        """timm's and the original code's evaluation transform: shorter side to floor(size / crop_pct), crop size x size."""
        return cls(math.floor(size / crop_pct), (size, size), **kwargs)

    @classmethod
    def from_image_processor(cls, cfg: dict) -> "Preprocess":
        """From a transformers ``preprocessor_config.json`` (ConvNeXt's crop_pct rule, ViT's exact resize,
        DeiT's resize then crop)."""
        size, crop_size = cfg.get("size", 224), cfg.get("crop_size")
        size = {"shortest_edge": size} if isinstance(size, int) else size
        crop = None
        if cfg.get("do_center_crop") and crop_size:
            crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else crop_size
            crop = (crop_size["height"], crop_size["width"])
        if "shortest_edge" in size:
            edge = size["shortest_edge"]
            if cfg.get("crop_pct") is not None:  # transformers' ConvNeXt: below 384 resize to edge/crop_pct, crop
                resize, crop = (int(edge / cfg["crop_pct"]), (edge, edge)) if edge < 384 else ((edge, edge), None)
            else:
                resize = edge
        elif "height" in size and "width" in size:
            resize = (size["height"], size["width"])
        else:
            raise WandaError(
                f"preprocessor config has an unsupported size {size}; expected shortest_edge or height and width"
            )
        normalise = cfg.get("do_normalize", True)
        mean = tuple(cfg.get("image_mean", IMAGENET_MEAN)) if normalise else (0.0, 0.0, 0.0)
        std = tuple(cfg.get("image_std", IMAGENET_STD)) if normalise else (1.0, 1.0, 1.0)
        names = {int(v): k for k, v in _RESAMPLE.items()}
        interpolation = names.get(int(cfg.get("resample", Image.Resampling.BICUBIC)), "bicubic")
        return cls(resize, crop, mean, std, interpolation)

    def to_image_processor(self) -> dict:
        """The inverse of ``from_image_processor`` (saved beside a pruned transformers checkpoint)."""
        out = {
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": int(_RESAMPLE[self.interpolation]),
        }
        if isinstance(self.resize, int):
            out["size"] = {"shortest_edge": self.resize}
        else:
            out["size"] = {"height": self.resize[0], "width": self.resize[1]}
        out["do_center_crop"] = self.crop is not None
        if self.crop is not None:
            out["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return out

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) float32, normalised."""
        image = image.convert("RGB")
        width, height = image.size
        if isinstance(self.resize, int):
            scale = self.resize / min(width, height)
            # round as torchvision does: the shorter side exactly ``resize``, the other truncated
            new = (self.resize, int(height * scale)) if width <= height else (int(width * scale), self.resize)
        else:
            new = (self.resize[1], self.resize[0])
        if new != (width, height):
            image = image.resize(new, _RESAMPLE[self.interpolation])
        if self.crop is not None:
            crop_h, crop_w = self.crop
            width, height = image.size
            if crop_h > height or crop_w > width:
                raise WandaError(f"center crop {self.crop} is larger than the resized image {(height, width)}")
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
            image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


class ImageFolder(torch.utils.data.Dataset):
    """``root/CLASS/IMAGE`` -> (preprocessed image, class index); ``classes`` fixes the index of each folder."""

    def __init__(self, root: str | Path, transform: Preprocess, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise WandaError(
                f"image folder {root} does not exist; --data_path must hold train/ and val/ folders "
                "with one sub-folder of images per class (the ImageNet layout)"
            )
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.classes = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise WandaError(
                f"{root} has class folders {unknown[:5]} that train/ lacks; both must use the same class folder names"
            )
        self.samples = [
            (path, index[name])
            for name in found
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise WandaError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/CLASS/")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(decode(path)), label


def decode(path: Path) -> Image.Image:
    """The image in ``path``, decoded, or one line naming the file: a file PIL cannot read or that ends early,
    and one declaring more than ``Image.MAX_IMAGE_PIXELS`` pixels (a decompression bomb: PIL only warns below
    twice the limit, and the warning is made an error here, so no image is decoded past the limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")  # a new image: the file closes here
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise WandaError(f"image {path} is too large to decode: {exc}".splitlines()[0]) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:  # PIL's decoders raise all of these
        raise WandaError(f"cannot decode image {path}: {exc}".splitlines()[0]) from None


#: The last line of a data-loader worker's re-raised error: ``module.Class: message``.
_LAST_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<cls>[A-Za-z_]\w*): (?P<message>.*)$")


def worker_error(exc: BaseException) -> BaseException:
    """A data-loader worker's error as the main process re-raises it (the worker's whole traceback in the
    message) cut down to its last line, the error itself; any other error as it is."""
    text = str(exc)
    if "DataLoader worker" not in text.split("\n", 1)[0]:
        return exc
    last = text.strip().splitlines()[-1]
    match = _LAST_LINE.match(last)
    if match is not None and match.group("cls") == "WandaError":
        return WandaError(match.group("message"))
    return WandaError(f"an image-decoding worker failed: {last}")


class _Loader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose workers' errors arrive as one line (``worker_error``)."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - re-raised, only shortened
                shorter = worker_error(exc)
                if shorter is exc:
                    raise
                raise shorter from None
            yield batch


def loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return _Loader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def calibration_batches(dataset: ImageFolder, nsamples: int, batch_size: int, seed: int, workers: int = 0):
    """Batches of images only, ``nsamples`` drawn without replacement with a seeded generator (all images
    when the set is smaller; the original code drew with replacement, so it could repeat an image)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[: min(nsamples, len(dataset))].tolist()
    subset = torch.utils.data.Subset(dataset, chosen)
    return (images for images, _ in loader(subset, batch_size, workers))
