"""Calibration statistics of the pruned layers, recorded by the shared ``wanda.stats.InputRecorder``.

The accumulators read a layer's input as (..., in_features), which is how ``nn.Linear`` sees it. A pointwise
convolution sees (batch, channels, height, width); its in_features are the channels, and each pixel is one
token. This subclass moves the channels last for those layers before the shared hook sees the input, so every
statistic and every method works on convolutions unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..stats import InputRecorder

__all__ = ["ClassifierInputRecorder"]


class ClassifierInputRecorder(InputRecorder):
    """``InputRecorder`` for ``nn.Linear`` and pointwise ``nn.Conv2d`` layers (see the module docstring).

    A convolution's channels-last view is a new tensor on every call, so convolutions reading the same input
    keep one accumulator each instead of sharing it; the statistics are the same either way.
    """

    def _hook(self, name: str):
        hook = super()._hook(name)
        if not isinstance(self.layers[name], nn.Conv2d):
            return hook

        def channels_last(module: nn.Module, args: tuple) -> None:
            x: torch.Tensor = args[0]  # (batch, channels, height, width)
            hook(module, (x.movedim(1, -1),) + tuple(args[1:]))  # (batch, height, width, channels)

        return channels_last
