"""``wanda vision``: prune an image classifier (ConvNeXt, DeiT, ViT) and report top-1 / top-5 before and after.

The seed's ``image_classifiers/main.py`` flags, plus N:M patterns, a choice of library, and atomic outputs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import WandaError
from ..io import atomic_directory, atomic_write_json, ensure_free
from ..models.loading import resolve_device
from ..resources import peak_rss_mb
from ..vision import (METRICS, VISION_METRICS, ImageFolder, VisionPruneSettings, calibration_batches,
                      load_classifier, prune_classifier, topk_accuracy)
from ..vision.data import Preprocess, loader
from ..vision.models import LIBRARIES
from .common import Parser, guarded, setup_logging

log = logging.getLogger("wanda.vision")

RESULTS_FILE = "results_vision.json"


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Prune the linear and 1x1 convolution layers of an image classifier's blocks "
               "(never its head) with magnitude or Wanda, then report top-1/top-5 accuracy on DATA_PATH/val.")
    g = p.add_argument_group("the seed's flags")
    g.add_argument("--model", default="convnext_base",
                   help="convnext_{tiny,small,base,large,xlarge}, deit_{tiny,small,base}[_distilled]_patch16_224, "
                   "vit_{tiny,small,base,large,huge}_patch{16,32}_224 (default: convnext_base)")
    g.add_argument("--resume", default=None, help="local weights: a state-dict file (.pth/.pt/.bin/.safetensors, "
                   "optionally under 'model') or a transformers from_pretrained folder; default: the hub checkpoint")
    g.add_argument("--data_path", required=True, help="folder with train/ and val/, one sub-folder per class")
    g.add_argument("--prune_metric", default="wanda", help=f"{' or '.join(VISION_METRICS)} (default: wanda)")
    g.add_argument("--prune_granularity", default="row",
                   help="layer (one threshold per matrix) or row (the same fraction of every output row) "
                   "(default: row)")
    g.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to prune; default 0.5 for unstructured, N/M for N:M (must equal it)")
    g.add_argument("--nsamples", type=int, default=4096, help="calibration images from train/ (default: 4096)")
    g.add_argument("--batch_size", type=int, default=64, help="images per forward pass (default: 64)")
    g.add_argument("--input_size", type=int, default=None, help="override the model's crop size")
    g.add_argument("--crop_pct", type=float, default=None, help="override: resize the shorter side to "
                   "input_size / crop_pct before the center crop")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default: 0)")
    r = p.add_argument_group("additions")
    r.add_argument("--sparsity_type", default="unstructured", help="'unstructured' or N:M such as 2:4, 4:8")
    r.add_argument("--library", default="auto", choices=LIBRARIES,
                   help="where --model comes from; auto: timm when it imports, else transformers")
    r.add_argument("--eval_limit", type=int, default=None, help="evaluate on at most this many val/ images "
                   "(a seeded random subset; default: all)")
    r.add_argument("--skip_dense_eval", action="store_true", help="do not evaluate the model before pruning")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    r.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes (default: min(4, CPUs))")
    r.add_argument("--save", default=None, help=f"folder for {RESULTS_FILE}")
    r.add_argument("--save_model", default=None, help="folder to write the pruned checkpoint to (atomically)")
    r.add_argument("--overwrite", action="store_true", help="replace existing results in --save / --save_model")
    r.add_argument("--no_progress", action="store_true", help="no progress bars")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _preprocess(base: Preprocess, args) -> Preprocess:
    if args.input_size is None and args.crop_pct is None:
        return base
    current = base.crop or base.resize
    size = args.input_size or (current if isinstance(current, int) else current[0])
    crop_pct = args.crop_pct or 0.875
    if not 0 < crop_pct <= 1 or size < 1:
        raise WandaError(f"--crop_pct must be in (0, 1] and --input_size positive; got {crop_pct}, {size}")
    return replace(Preprocess.center_crop_pct(size, crop_pct), mean=base.mean, std=base.std,
                   interpolation=base.interpolation)


def _check_args(args, settings: VisionPruneSettings) -> None:
    settings.validate()
    if args.eval_limit is not None and args.eval_limit < 1:
        raise WandaError(f"--eval_limit must be at least 1, got {args.eval_limit}")
    if args.workers < 0:
        raise WandaError(f"--workers must be at least 0, got {args.workers}")
    for split in ("train", "val"):
        if not (Path(args.data_path) / split).is_dir():
            raise WandaError(f"--data_path {args.data_path} has no {split}/ folder; it must hold train/ and val/, "
                             "each with one sub-folder of images per class (the ImageNet layout)")
    if args.save:
        ensure_free(Path(args.save) / RESULTS_FILE, args.overwrite, "result")
    if args.save_model:
        ensure_free(args.save_model, args.overwrite, "model folder")


def _eval_subset(dataset: ImageFolder, limit: int | None, seed: int):
    if limit is None or limit >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.utils.data.Subset(dataset, sorted(chosen.tolist()))


def _fmt(acc: dict, key: str) -> str:
    return f"{acc[key]:.2f}" if key in acc else "-"


def run(argv: list[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    setup_logging(args.verbose)
    settings = VisionPruneSettings(metric=args.prune_metric, granularity=args.prune_granularity,
                                   sparsity=args.sparsity, sparsity_type=args.sparsity_type, nsamples=args.nsamples,
                                   batch_size=args.batch_size, seed=args.seed)
    _check_args(args, settings)
    device = resolve_device(args.device)
    start = time.perf_counter()
    root = Path(args.data_path)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    loaded = load_classifier(args.model, args.resume, args.library, num_classes=len(classes))
    if loaded.num_classes != len(classes):
        raise WandaError(f"{args.model} has {loaded.num_classes} outputs but {root / 'train'} has {len(classes)} "
                         "class folders; the folders must be the model's classes (ImageNet: all 1000 synsets)")
    preprocess = _preprocess(loaded.preprocess, args)
    if preprocess != loaded.preprocess:  # the saved checkpoint then describes the preprocessing actually used
        loaded.preprocess, loaded.processor_config = preprocess, None
    log.info("%s from %s (%s); preprocessing %s", args.model, args.resume or "the hub", loaded.library, preprocess)
    model = loaded.model.to(device)
    train = ImageFolder(root / "train", preprocess)
    val = _eval_subset(ImageFolder(root / "val", preprocess, classes=train.classes), args.eval_limit, args.seed)
    progress = not args.no_progress

    def evaluate(label: str) -> dict:
        return topk_accuracy(model, loader(val, settings.batch_size, args.workers), loaded.forward,
                             desc=f"{label} eval", progress=progress)

    dense = {} if args.skip_dense_eval else evaluate("dense")
    if settings.nsamples > len(train) and METRICS[settings.metric].statistic is not None:
        log.info("--nsamples %d is more than the %d training images; calibrating on all of them",
                 settings.nsamples, len(train))
    calibration = calibration_batches(train, settings.nsamples, settings.batch_size, settings.seed, args.workers)
    report = prune_classifier(model, calibration, settings, loaded.forward)
    pruned = evaluate("pruned")

    pattern = str(settings.pattern) if settings.pattern.is_nm else f"per {settings.granularity}"
    print(f"\n{settings.metric} {pattern} (sparsity {settings.sparsity:g}) on {args.model} [{loaded.library}]: "
          f"actual sparsity {report.actual_sparsity:.4f} over {len(report.layers)} layers; head {report.head} dense; "
          f"{report.calibration_images} calibration images; {pruned['images']} val images")
    print("| model | top-1 % | top-5 % | cross-entropy |")
    print("|---|---|---|---|")
    for label, acc in (("dense", dense), ("pruned", pruned)):
        if acc:
            print(f"| {label} | {_fmt(acc, 'top1')} | {_fmt(acc, 'top5')} | {acc['loss']:.4f} |")
    sys.stdout.flush()

    results = {"model": args.model, "library": loaded.library, "resume": args.resume, "data_path": str(root),
               "preprocess": preprocess.to_dict(), "prune": report.to_dict(),
               "accuracy": {"dense": dense, "pruned": pruned}, "device": str(device),
               "total_wall_seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    if args.save:
        atomic_write_json(Path(args.save) / RESULTS_FILE, results, args.overwrite)
        log.info("results written to %s", Path(args.save) / RESULTS_FILE)
    if args.save_model:
        with atomic_directory(args.save_model, overwrite=args.overwrite) as tmp:
            loaded.save(tmp, {k: v for k, v in results.items() if k != "prune"} | {"actual_sparsity":
                                                                                    report.actual_sparsity})
        log.info("pruned checkpoint written to %s", args.save_model)
    return 0


def main(argv: list[str] | None = None, prog: str = "wanda vision") -> None:
    guarded(lambda: run(list(sys.argv[1:] if argv is None else argv), prog), prog)
