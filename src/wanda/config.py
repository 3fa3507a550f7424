"""The pruning method's settings, shared by the command line and the Python API."""

from __future__ import annotations

from dataclasses import dataclass

from .masks.pattern import PatternField, SparsityPattern
from .methods.registry import METHOD_SPECS
from .settings import SettingsMixin, require, setting

__all__ = ["SparsityPattern", "PruneSettings", "METHODS"]

#: Methods accepted by ``--prune_method``: the registry's names, in its order.
METHODS = tuple(METHOD_SPECS)


@dataclass(frozen=True)
class PruneSettings(PatternField, SettingsMixin):
    """What to prune and how. ``sparsity_ratio=None`` means N/M for N:M patterns and 0.5 for unstructured;
    after construction it holds the resolved ratio."""

    prune_method: str = setting("wanda", "pruning method", choices=METHODS)
    sparsity_ratio: float | None = setting(
        None, "fraction of weights to prune (default: 0.5 for unstructured, N/M for N:M, which it must equal)")
    sparsity_type: str = setting("unstructured", "'unstructured' or N:M such as 2:4, 4:8")
    use_variant: bool = setting(False, "Wanda's appendix variant: per row, prune up to a cumulative-score "
                                "threshold alpha * (row sum), alpha by bisection")
    #: Columns per lazy OBS update (SparseGPT's B = 128); also the re-selection period of the ``iter`` ablations.
    blocksize: int = setting(128, "columns per lazy OBS update (SparseGPT's B); the iter ablations' period")
    #: Hessian dampening as a fraction of its mean diagonal (SparseGPT's 1%).
    percdamp: float = setting(0.01, "Hessian dampening, a fraction of its mean diagonal (SparseGPT's 1%%)")
    #: Relative tolerance of the Wanda variant's bisection on the achieved sparsity.
    variant_tolerance: float = setting(1e-3, "relative tolerance of the variant's bisection on the sparsity")

    def __post_init__(self) -> None:
        require(self.prune_method in METHOD_SPECS,
                f"--prune_method must be one of {', '.join(METHOD_SPECS)}; got {self.prune_method!r}")
        pattern = SparsityPattern.parse(self.sparsity_type)
        self._set("sparsity_ratio", pattern.resolve_ratio(self.sparsity_ratio))
        require(not self.use_variant or (self.prune_method == "wanda" and not pattern.is_nm),
                "--use_variant applies to --prune_method wanda with unstructured sparsity only")
        require(self.blocksize >= 1, f"--blocksize must be at least 1, got {self.blocksize}")
        require(not pattern.is_nm or self.blocksize % pattern.m == 0,
                f"--blocksize {self.blocksize} must be a multiple of M={pattern.m}")
        require(0 <= self.percdamp < 1, f"--percdamp must be in [0, 1), got {self.percdamp}")
        require(0 < self.variant_tolerance < 1, f"--variant_tolerance must be in (0, 1), got {self.variant_tolerance}")

    @property
    def method(self) -> str:
        return self.prune_method

    def to_dict(self) -> dict:
        return {**super().to_dict(), "method": self.prune_method}
