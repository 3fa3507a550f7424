"""Calibration statistics of a linear layer's inputs, accumulated batch by batch in fp32."""

from .accumulators import (
    ChannelSum,
    Combined,
    Gram,
    InputStatistic,
    SquaredNorm,
    flatten_inputs,
    part,
    statistic_factory,
)
from .hooks import InputRecorder

__all__ = [
    "ChannelSum",
    "Combined",
    "Gram",
    "InputStatistic",
    "SquaredNorm",
    "flatten_inputs",
    "part",
    "statistic_factory",
    "InputRecorder",
]
