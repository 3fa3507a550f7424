"""Weight quantization settings, declared like every other job's settings (``wanda.settings``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..utils.declare import SettingsMixin, require, setting
from .grid import BITS, QuantGrid

__all__ = ["QuantSettings"]


@dataclass(frozen=True)
class QuantSettings(SettingsMixin):
    """GPTQ weight quantization (Frantar et al., ICLR 2023) after pruning; ``wbits=None`` leaves weights in
    floating point. ``grid()`` is the matching ``QuantGrid`` (None without quantization)."""

    _argument_group_name: ClassVar[str] = "quantization"

    wbits: int | None = setting(
        None,
        "quantize weights to this many bits with GPTQ, keeping pruned zeros (default: no quantization)",
        choices=BITS,
    )
    groupsize: int = setting(128, "input columns sharing one quantization scale per row (-1: one scale per row)")
    sym: bool = setting(False, "symmetric quantization grid (codes centred on 0) instead of a zero-point per group")

    def __post_init__(self) -> None:
        require(
            self.wbits is None
            or (isinstance(self.wbits, int) and not isinstance(self.wbits, bool) and self.wbits in BITS),
            f"--wbits must be one of {', '.join(map(str, BITS))}, got {self.wbits!r}",
        )
        require(
            isinstance(self.groupsize, int)
            and not isinstance(self.groupsize, bool)
            and (self.groupsize == -1 or self.groupsize >= 1),
            f"--groupsize must be -1 (one group per row) or a positive integer, got {self.groupsize!r}",
        )
        require(isinstance(self.sym, bool), f"--sym must be true or false, got {self.sym!r}")

    def grid(self) -> QuantGrid | None:
        return None if self.wbits is None else QuantGrid(self.wbits, self.groupsize, self.sym)
