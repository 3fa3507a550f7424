"""``wanda vision``: prune an image classifier (ConvNeXt, DeiT, ViT) and report top-1 / top-5 before and after.

The original code's ``image_classifiers/main.py`` flags, plus N:M patterns, a choice of library, and atomic outputs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import WandaError
from ..methods import get_method
from ..utils.declare import SettingsMixin, require, setting
from ..utils.devices import resolve_device
from ..utils.io import atomic_directory, atomic_write_json, ensure_free
from ..utils.overlap import check_disjoint
from ..utils.resources import peak_rss_mb
from ..utils.space import check_space, weights_bytes
from ..vision import (
    ImageFolder,
    VisionPruneReport,
    VisionPruneSettings,
    calibration_batches,
    load_classifier,
    prune_classifier,
    topk_accuracy,
)
from ..vision.data import Preprocess, loader
from ..vision.models import LIBRARIES
from .common import LogSettings, ResultsSettings

log = logging.getLogger("wanda.vision")

RESULTS_FILE = "results_vision.json"


#: Crop sizes accepted by --input_size (pixels).
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 4096


@dataclass(frozen=True)
class ClassifierSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "model and data"

    data_path: str = setting(help="folder with train/ and val/, one sub-folder of images per class")
    model: str = setting(
        "convnext_base",
        "convnext_{tiny,small,base,large,xlarge}, "
        "deit_{tiny,small,base}[_distilled]_patch16_224, vit_{tiny,small,base,large,huge}_patch{16,32}_224",
    )
    resume: str | None = setting(
        None,
        "local weights: a state-dict file (.pth/.pt/.bin/.safetensors, optionally "
        "under 'model') or a transformers from_pretrained folder (default: the hub checkpoint)",
    )
    library: str = setting(
        "auto", "where --model comes from; auto: timm when it imports, else transformers", choices=LIBRARIES
    )
    input_size: int | None = setting(None, "override the model's crop size")
    crop_pct: float | None = setting(
        None, "override: resize the shorter side to input_size / crop_pct before the center crop"
    )
    eval_limit: int | None = setting(
        None, "evaluate on at most this many val/ images (a seeded random subset; default: all)"
    )
    skip_dense_eval: bool = setting(False, "do not evaluate the model before pruning")
    device: str = setting("auto", "cpu, cuda, cuda:N (auto: cuda if available)")
    workers: int = setting(min(4, os.cpu_count() or 1), "image decoding processes (min(4, CPUs))")
    save_model: str | None = setting(None, "folder to write the pruned checkpoint to (atomically)")
    no_progress: bool = setting(False, "no progress bars")

    def __post_init__(self) -> None:
        require(
            self.eval_limit is None or self.eval_limit >= 1, f"--eval_limit must be at least 1, got {self.eval_limit}"
        )
        require(self.workers >= 0, f"--workers must be at least 0, got {self.workers}")
        # below 32 pixels a ViT/DeiT patch (16 or 32) or a ConvNeXt stem no longer fits; above 4096 the resize
        # itself overflows PIL
        require(
            self.input_size is None or MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE,
            f"--input_size must be in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}], got {self.input_size}",
        )
        for split in ("train", "val"):
            require(
                (Path(self.data_path) / split).is_dir(),
                f"--data_path {self.data_path} has no {split}/ folder; it must hold train/ and val/, each with "
                "one sub-folder of images per class (the ImageNet layout)",
            )

    def preprocess(self, base: Preprocess) -> Preprocess:
        if self.input_size is None and self.crop_pct is None:
            return base
        current = base.crop or base.resize
        size = self.input_size or (current if isinstance(current, int) else current[0])
        crop_pct = self.crop_pct or 0.875
        if not 0 < crop_pct <= 1 or size < 1:
            raise WandaError(f"--crop_pct must be in (0, 1] and --input_size positive; got {crop_pct}, {size}")
        return replace(
            Preprocess.center_crop_pct(size, crop_pct), mean=base.mean, std=base.std, interpolation=base.interpolation
        )


#: The settings of ``wanda vision``.
VISION_JOB = (ClassifierSettings, VisionPruneSettings, ResultsSettings, LogSettings)


def _eval_subset(dataset: ImageFolder, limit: int | None, seed: int):
    if limit is None or limit >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.utils.data.Subset(dataset, sorted(chosen.tolist()))


def _fmt(acc: dict, key: str) -> str:
    return f"{acc[key]:.2f}" if key in acc else "-"


def _print_accuracy(
    job: ClassifierSettings,
    settings: VisionPruneSettings,
    library: str,
    report: VisionPruneReport,
    dense: dict,
    pruned: dict,
) -> None:
    pattern = str(settings.pattern) if settings.pattern.is_nm else f"per {settings.granularity}"
    print(
        f"\n{settings.metric} {pattern} (sparsity {settings.sparsity:g}) on {job.model} [{library}]: "
        f"actual sparsity {report.actual_sparsity:.4f} over {len(report.layers)} layers; head {report.head} dense; "
        f"{report.calibration_images} calibration images; {pruned['images']} val images"
    )
    print("| model | top-1 % | top-5 % | cross-entropy |")
    print("|---|---|---|---|")
    for label, acc in (("dense", dense), ("pruned", pruned)):
        if acc:
            print(f"| {label} | {_fmt(acc, 'top1')} | {_fmt(acc, 'top5')} | {acc['loss']:.4f} |")
    sys.stdout.flush()


def _write_outputs(job: ClassifierSettings, results: ResultsSettings, loaded, out: dict, sparsity: float) -> None:
    if results.save:
        atomic_write_json(Path(results.save) / RESULTS_FILE, out, results.overwrite)
        log.info("results written to %s", Path(results.save) / RESULTS_FILE)
    if job.save_model:
        with atomic_directory(job.save_model, overwrite=results.overwrite) as tmp:
            loaded.save(tmp, {k: v for k, v in out.items() if k != "prune"} | {"actual_sparsity": sparsity})
        log.info("pruned checkpoint written to %s", job.save_model)


def _calibration(train: ImageFolder, settings: VisionPruneSettings, workers: int):
    """The calibration batches, all training images when ``--nsamples`` asks for more (said in one line)."""
    if settings.nsamples > len(train) and get_method(settings.metric).statistic is not None:
        log.info(
            "--nsamples %d is more than the %d training images; calibrating on all of them",
            settings.nsamples,
            len(train),
        )
    return calibration_batches(train, settings.nsamples, settings.batch_size, settings.seed, workers)


def _check_outputs(job: ClassifierSettings, results: ResultsSettings) -> None:
    """Before anything loads: no output on an input, and none that exists without --overwrite."""
    check_disjoint(
        {"--data_path": job.data_path, "--model": job.model, "--resume": job.resume},
        {"--save": results.save, "--save_model": job.save_model},
    )
    results.claim(RESULTS_FILE)
    if job.save_model:
        ensure_free(job.save_model, results.overwrite, "model folder")


def run_vision_job(
    job: ClassifierSettings, settings: VisionPruneSettings, results: ResultsSettings, logging_settings: LogSettings
) -> int:
    _check_outputs(job, results)
    device = resolve_device(job.device)
    start = time.perf_counter()
    root = Path(job.data_path)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    loaded = load_classifier(job.model, job.resume, job.library, num_classes=len(classes))
    if loaded.num_classes != len(classes):
        raise WandaError(
            f"{job.model} has {loaded.num_classes} outputs but {root / 'train'} has {len(classes)} "
            "class folders; the folders must be the model's classes (ImageNet: all 1000 synsets)"
        )
    preprocess = job.preprocess(loaded.preprocess)
    if preprocess != loaded.preprocess:  # the saved checkpoint then describes the preprocessing actually used
        loaded.preprocess, loaded.processor_config = preprocess, None
    log.info("%s from %s (%s); preprocessing %s", job.model, job.resume or "the hub", loaded.library, preprocess)
    model = loaded.model.to(device)
    if job.save_model:  # before the evaluations and the pruning: a disk that cannot hold it stops the run now
        check_space([(job.save_model, weights_bytes(model), "the pruned checkpoint")])
    train = ImageFolder(root / "train", preprocess)
    val = _eval_subset(ImageFolder(root / "val", preprocess, classes=train.classes), job.eval_limit, settings.seed)

    def evaluate(label: str) -> dict:
        return topk_accuracy(
            model,
            loader(val, settings.batch_size, job.workers),
            loaded.forward,
            desc=f"{label} eval",
            progress=not job.no_progress,
        )

    dense = {} if job.skip_dense_eval else evaluate("dense")
    calibration = _calibration(train, settings, job.workers)
    report = prune_classifier(model, calibration, settings, loaded.forward)
    pruned = evaluate("pruned")

    _print_accuracy(job, settings, loaded.library, report, dense, pruned)

    out = {
        "model": job.model,
        "library": loaded.library,
        "resume": job.resume,
        "data_path": str(root),
        "preprocess": preprocess.to_dict(),
        "prune": report.to_dict(),
        "accuracy": {"dense": dense, "pruned": pruned},
        "device": str(device),
        "total_wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    _write_outputs(job, results, loaded, out, report.actual_sparsity)
    return 0
