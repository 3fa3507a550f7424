"""Pruning image classifiers (ConvNeXt, DeiT, ViT) with magnitude or Wanda, per layer, per row or N:M.

Built on the language models' statistics (``wanda.stats``), scores (``wanda.methods.scores``) and mask
selection (``wanda.masks``); only what is specific to image classifiers lives here::

    from wanda.vision import VisionPruneSettings, load_classifier, prune_classifier
    loaded = load_classifier("convnext_base", resume="convnext_base_hf/")
    report = prune_classifier(loaded.model, calibration_batches, VisionPruneSettings(prune_metric="wanda",
                              prune_granularity="row", sparsity=0.5), loaded.forward)
"""

from .config import GRANULARITIES, VISION_METRICS, VisionPruneSettings
from .data import ImageFolder, Preprocess, calibration_batches
from .evaluate import topk_accuracy
from .layout import ClassifierLayout, find_layout, is_pointwise_conv
from .models import LoadedClassifier, load_classifier, named_spec, read_state_dict
from .prune import VisionLayerReport, VisionPruneReport, layer_mask, prune_classifier, record_statistics
from .recorder import ClassifierInputRecorder

__all__ = [
    "GRANULARITIES",
    "VISION_METRICS",
    "VisionPruneSettings",
    "ImageFolder",
    "Preprocess",
    "calibration_batches",
    "topk_accuracy",
    "ClassifierLayout",
    "find_layout",
    "is_pointwise_conv",
    "LoadedClassifier",
    "load_classifier",
    "named_spec",
    "read_state_dict",
    "VisionLayerReport",
    "VisionPruneReport",
    "layer_mask",
    "prune_classifier",
    "record_statistics",
    "ClassifierInputRecorder",
]
