"""Checking after training or merging that every pruned weight is still exactly zero."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import WandaError
from ..masks import overall_sparsity, zero_fraction
from .masks import PrunedMasks, masked_weight

__all__ = ["MatrixSparsity", "SparsityReport", "SparsityLost", "verify_sparsity"]


class SparsityLost(WandaError):
    """Pruned weights became non-zero: a bug in the masking, never the user's fault."""


@dataclass
class MatrixSparsity:
    name: str
    shape: tuple[int, ...]
    #: Fraction of exact zeros now.
    sparsity: float
    #: Weights pruned when the mask was captured.
    pruned: int
    #: Of those, how many are non-zero now (must be 0).
    revived: int


@dataclass
class SparsityReport:
    matrices: list[MatrixSparsity] = field(default_factory=list)

    @property
    def revived(self) -> int:
        return sum(m.revived for m in self.matrices)

    @property
    def sparsity(self) -> float:
        """Zeros over all checked matrices, weighted by their size."""
        return overall_sparsity((m.shape, m.sparsity) for m in self.matrices)

    @property
    def pruned_sparsity(self) -> float:
        """The fraction that was pruned when the masks were captured (what ``sparsity`` must not fall below)."""
        total = sum(math.prod(m.shape) for m in self.matrices)
        return sum(m.pruned for m in self.matrices) / total if total else 0.0

    def raise_if_revived(self, what: str = "the model") -> None:
        if self.revived:
            bad = [m for m in self.matrices if m.revived]
            listing = ", ".join(f"{m.name} ({m.revived})" for m in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise SparsityLost(
                f"{self.revived} pruned weights of {what} became non-zero in {len(bad)} matrices: {listing}. "
                "The masking failed; this is a bug, please report it with the command line you ran"
            )

    def table(self) -> str:
        """A markdown table of every matrix, then the total."""
        lines = ["| matrix | shape | sparsity | pruned | revived |", "|---|---|---|---|---|"]
        for m in self.matrices:
            lines.append(f"| {m.name} | {'x'.join(map(str, m.shape))} | {m.sparsity:.4f} | {m.pruned} | {m.revived} |")
        lines.append(
            f"| all {len(self.matrices)} | - | {self.sparsity:.4f} | "
            f"{sum(m.pruned for m in self.matrices)} | {self.revived} |"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "pruned_sparsity": self.pruned_sparsity,
            "revived": self.revived,
            "matrices": [asdict(m) for m in self.matrices],
        }


@torch.no_grad()
def verify_sparsity(model: nn.Module, masks: PrunedMasks) -> SparsityReport:
    """Sparsity of every masked matrix of ``model`` and how many of its pruned weights are non-zero."""
    report = SparsityReport()
    for name, mask in masks.items():
        weight = masked_weight(model, name)
        if weight.shape != mask.shape:
            raise WandaError(f"mask of {name} has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}")
        zeros = weight == 0
        revived = int((mask.to(weight.device) & ~zeros).sum())
        report.matrices.append(
            MatrixSparsity(name, tuple(weight.shape), zero_fraction(weight), int(mask.sum()), revived)
        )
    return report
