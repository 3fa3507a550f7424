"""Seeing what each expert of a fused mixture-of-experts layer reads, during its real forward pass.

A fused experts module holds every expert in one 3-D parameter and, in its eager forward, slices expert e out
(``self.gate_up_proj[e]``) and applies it to the tokens the router sent to e. No module boundary separates the
experts, so no forward hook can see those inputs. Instead the module's forward is wrapped, for the duration of
the recording, by a ``TorchFunctionMode`` that watches every ``F.linear`` / matmul: when its weight operand is
a view of a tracked parameter at the offset of expert e, the other operand is exactly expert e's input (the
routed hidden states for ``gate_up_proj``, the activated intermediate states for ``down_proj``, as the model
itself computed them). The wrapper calls the eager forward even where ``transformers`` would dispatch to a
grouped kernel (its default), since a grouped matmul takes all experts at once.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

#: on_input(module, parameter name, expert index, input of shape (tokens, in_features))
InputSink = Callable[[nn.Module, str, int, torch.Tensor], None]

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.matmul, torch.Tensor.mm}


def _expert_of(weight: torch.Tensor, param: torch.Tensor) -> int | None:
    """Which expert's slice ``weight`` is, when it is ``param[e]`` (a view sharing its storage); else None."""
    if weight.dim() != 2 or tuple(weight.shape) != tuple(param.shape[1:]) or weight.stride() != param.stride()[1:]:
        return None
    if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return None
    offset = weight.storage_offset() - param.storage_offset()
    expert, rest = divmod(offset, param.stride(0))
    return expert if rest == 0 and 0 <= expert < param.shape[0] else None


class _WatchExperts(TorchFunctionMode):
    def __init__(self, module: nn.Module, parameters: dict[str, bool], sink: InputSink):
        super().__init__()
        self.module = module
        self.parameters = parameters  # name -> transposed (x @ W) rather than F.linear(x, W)
        self.sink = sink
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR or func in _MATMUL:
            # (input, weight) of F.linear, (input, other) of a matmul, passed by position or by name
            operands = [*args[:2], *(kwargs[k] for k in ("input", "weight", "other") if k in kwargs)]
            x, weight = (operands + [None, None])[:2]
            for name, transposed in self.parameters.items():
                if transposed != (func in _MATMUL) or not isinstance(weight, torch.Tensor):
                    continue
                expert = _expert_of(weight, getattr(self.module, name))
                if expert is not None:
                    self.seen += 1
                    self.sink(self.module, name, expert, x.detach())
                    break
        return func(*args, **kwargs)


class ExpertInputTap:
    """Wraps ``module.forward`` (an instance attribute, removed by ``remove``) to report each expert's inputs.

    ``parameters``: the fused parameters to watch, name -> transposed. ``unobserved`` turns True when a forward
    with tokens used none of their slices (an implementation that does not index per expert).
    """

    def __init__(self, module: nn.Module, parameters: dict[str, bool], sink: InputSink):
        self.module = module
        self.unobserved = False
        forward = type(module).forward
        # transformers' experts decorator dispatches on config._experts_implementation and keeps the eager
        # forward as __wrapped__ (functools.wraps)
        eager = getattr(forward, "__wrapped__", forward)

        def watched(*args, **kwargs):
            mode = _WatchExperts(module, parameters, sink)
            with mode:
                out = eager(module, *args, **kwargs)
            hidden = args[0] if args else next(iter(kwargs.values()), None)
            if mode.seen == 0 and isinstance(hidden, torch.Tensor) and hidden.numel() > 0:
                self.unobserved = True
            return out

        module.forward = watched

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)
