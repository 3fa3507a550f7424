"""Forward hooks that feed layer inputs into accumulators, with one owner that always removes them.

Layers that read the very same input tensor (q/k/v after one norm, gate/up in a gated MLP) share one
accumulator: the Gram matrix is the costliest statistic, and computing it once per distinct input is what
keeps SparseGPT near the cost of the forward passes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn

from .accumulators import InputStatistic

StatFactory = Callable[[int, torch.device], InputStatistic]


class InputRecorder(AbstractContextManager):
    """``with InputRecorder(layers, factory) as rec: run forwards``; then ``rec.stats[name]``.

    Sharing is detected on the first batch by tensor identity (a reference is held for the batch, so a
    freed tensor's address cannot be reused by a later input and be mistaken for the same one).
    """

    def __init__(self, layers: dict[str, nn.Linear], factory: StatFactory):
        self.layers = layers
        self.factory = factory
        self.stats: dict[str, InputStatistic] = {}
        self._owner: dict[str, str] = {}  # layer name -> name of the layer whose accumulator it uses
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "InputRecorder":
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._batch_inputs.clear()

    def end_batch(self) -> None:
        """Drop the references held for sharing detection (call after each forward pass)."""
        self._batch_inputs.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self._owner:
                owner = next((n for t, n in self._batch_inputs if t is x), name)
                self._owner[name] = owner
                if owner == name:
                    self.stats[name] = self.factory(x.shape[-1], x.device)
                    self._batch_inputs.append((x, name))
            if self._owner[name] == name:
                self.stats[name].add(x.detach())

        return hook

    def stat(self, name: str) -> InputStatistic:
        return self.stats[self._owner[name]]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Accumulator owner -> the layers sharing it (for logs and tests)."""
        out: dict[str, list[str]] = {}
        for name, owner in self._owner.items():
            out.setdefault(owner, []).append(name)
        return out
