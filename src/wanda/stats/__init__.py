"""Calibration statistics of a linear layer's inputs, accumulated batch by batch in fp32."""

from .accumulators import Gram, InputStatistic, SquaredNorm, flatten_inputs
from .hooks import InputRecorder

__all__ = ["Gram", "InputStatistic", "SquaredNorm", "flatten_inputs", "InputRecorder"]
