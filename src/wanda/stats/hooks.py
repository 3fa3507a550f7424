"""Forward hooks that feed layer inputs into accumulators, with one owner that always removes them.

Layers that read the very same input tensor (q/k/v after one norm, gate/up in a gated MLP) share one
accumulator: the Gram matrix is the costliest statistic, and computing it once per distinct input is what
keeps SparseGPT near the cost of the forward passes.

Experts of a fused mixture-of-experts parameter have no module of their own: their inputs come from
``stats.experts.ExpertInputTap`` (the tokens the router sent to each expert, as the model computed them), and
the gate and up halves of one expert's ``gate_up_proj`` slice share that expert's accumulator. A matrix that
received no token has no statistic at all (``stat`` returns None), never one of zeros.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn

from ..models.matrices import PrunableMatrix
from .accumulators import InputStatistic
from .experts import ExpertInputTap

StatFactory = Callable[[int, torch.device], InputStatistic]


class InputRecorder(AbstractContextManager):
    """``with InputRecorder(layers, factory) as rec: run forwards``; then ``rec.stats[name]``.

    Sharing is detected on the first batch by tensor identity (a reference is held for the batch, so a
    freed tensor's address cannot be reused by a later input and be mistaken for the same one).
    """

    def __init__(self, layers: dict[str, nn.Module | PrunableMatrix], factory: StatFactory):
        """``layers``: modules (``nn.Linear``) or ``find_prunable``'s matrices, by name."""
        self.layers = {
            n: m.module if isinstance(m, PrunableMatrix) and m.expert is None else m for n, m in layers.items()
        }
        self.factory = factory
        self.stats: dict[str, InputStatistic] = {}
        self._owner: dict[str, str] = {}  # layer name -> name of the layer whose accumulator it uses
        self._batch_inputs: list[tuple[torch.Tensor, str]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._taps: list[ExpertInputTap] = []
        # fused experts: (module id, parameter, expert) -> the input key its matrices share
        self._expert_keys: dict[tuple[int, str, int], str] = {}

    def __enter__(self) -> "InputRecorder":
        try:
            fused: dict[int, tuple[nn.Module, dict[str, bool]]] = {}
            for name, layer in self.layers.items():
                if isinstance(layer, PrunableMatrix):  # an expert's slice of a fused parameter
                    self._owner[name] = layer.input_key
                    self._expert_keys[(id(layer.module), layer.parameter, layer.expert)] = layer.input_key
                    fused.setdefault(id(layer.module), (layer.module, {}))[1][layer.parameter] = layer.transposed
                else:
                    self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
            for module, parameters in fused.values():
                self._taps.append(ExpertInputTap(module, parameters, self._expert_input))
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
        for tap in self._taps:
            tap.remove()
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

    def _expert_input(self, module: nn.Module, parameter: str, expert: int, x: torch.Tensor) -> None:
        key = self._expert_keys[(id(module), parameter, expert)]
        if key not in self.stats:
            self.stats[key] = self.factory(x.shape[-1], x.device)
        self.stats[key].add(x)

    @property
    def unobserved(self) -> set[int]:
        """ids of fused experts modules whose forward never showed a per-expert input (see ExpertInputTap)."""
        return {id(tap.module) for tap in self._taps if tap.unobserved}

    def stat(self, name: str) -> InputStatistic | None:
        """The statistic of layer ``name``; None when it received no calibration token."""
        return self.stats.get(self._owner.get(name, name))

    @property
    def groups(self) -> dict[str, list[str]]:
        """Accumulator owner -> the layers sharing it (for logs and tests)."""
        out: dict[str, list[str]] = {}
        for name, owner in self._owner.items():
            out.setdefault(owner, []).append(name)
        return out
