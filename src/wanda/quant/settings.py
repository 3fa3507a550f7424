"""Weight quantization settings, declared like every other job's settings (``wanda.settings``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..utils.declare import SettingsMixin, require, setting
from .grid import BITS, GGUFGrid, Grid, QuantGrid

#: ``--gguf_type`` choices and their bit widths: the GGUF block types whose grid holds zero exactly.
GGUF_BITS = {"Q8_0": 8, "Q4_0": 4}

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
    gguf_type: str | None = setting(
        None,
        "GGUF block type of --save_format gguf; with --wbits, GPTQ runs on this type's grid (Q8_0: --wbits 8, "
        "Q4_0: --wbits 4, both with --groupsize 32 --sym)",
        choices=tuple(GGUF_BITS),
    )

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
        require(
            self.gguf_type is None or self.gguf_type in GGUF_BITS,
            f"--gguf_type must be one of {', '.join(GGUF_BITS)}, got {self.gguf_type!r}",
        )
        if self.gguf_type is not None and self.wbits is not None:
            # the error GPTQ minimises must be the error of the file: its grid is the GGUF type's
            bits = GGUF_BITS[self.gguf_type]
            require(
                self.wbits == bits and self.groupsize == 32 and self.sym,
                f"--gguf_type {self.gguf_type} quantizes to its own grid (blocks of 32, one symmetric fp16 scale): "
                f"pass --wbits {bits} --groupsize 32 --sym, or leave out --wbits for its round-to-nearest; got "
                f"--wbits {self.wbits} --groupsize {self.groupsize}{' --sym' if self.sym else ''}",
            )

    def grid(self) -> Grid | None:
        if self.wbits is None:
            return None
        if self.gguf_type is not None:
            return GGUFGrid(self.gguf_type)
        return QuantGrid(self.wbits, self.groupsize, self.sym)
