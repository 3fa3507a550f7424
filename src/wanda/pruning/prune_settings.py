"""The pruning method's settings, shared by the command line and the Python API."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..masks.pattern import PatternField, SparsityPattern
from ..methods import (
    DSNOT_BASES,
    METHOD_SETTINGS,
    METHOD_SPECS,
    DsnotSettings,
    LayerSettings,
    get_method,
    settings_from,
)
from ..methods.owl import DEFAULT_LAMBDA, DEFAULT_M
from ..models.targets import MatrixTargets, parse_ratio_pairs
from ..utils.declare import SettingsMixin, require, setting
from .profiles import PROFILES

__all__ = ["SparsityPattern", "PruneSettings", "METHODS"]

#: Methods accepted by ``--prune_method``: the registry's names, in its order.
METHODS = tuple(METHOD_SPECS)


@dataclass(frozen=True)
class _Target:
    """The first flags of a prune run: the method, the ratio and the pattern."""

    prune_method: str = setting("wanda", "pruning method", choices=METHODS)
    sparsity_ratio: float | None = setting(
        None, "fraction of weights to prune (default: 0.5 for unstructured, N/M for N:M, which it must equal)"
    )
    sparsity_type: str = setting("unstructured", "'unstructured' or N:M such as 2:4, 4:8")


@dataclass(frozen=True)
class PruneSettings(*reversed(METHOD_SETTINGS), _Target, PatternField, SettingsMixin):
    """What to prune and how. ``sparsity_ratio=None`` means N/M for N:M patterns and 0.5 for unstructured;
    after construction it holds the resolved ratio. Each method's own settings (and DSnoT's) are declared in
    the method's module and come in as bases (``wanda.methods.METHOD_SETTINGS``); a method receives only
    them, with its matrix's ratio and pattern (``layer``). The fields read in this order: what to prune, each
    method's own, then how the ratio is spread and which matrices are targeted."""

    #: How the ratio is spread over the layers (``wanda.pruning.profiles``): the same everywhere, or OWL's per block.
    sparsity_profile: str = setting(
        "uniform",
        "per-layer sparsity: 'uniform' (every layer at --sparsity_ratio) "
        "or 'owl' (OWL: blocks with more activation outliers pruned less, "
        "averaging --sparsity_ratio; unstructured only) or 'atp' (ATP: the "
        "ratio rising linearly with depth, exact overall; unstructured only)",
        choices=tuple(PROFILES),
    )
    #: OWL's M: a score above M times its block's mean is an outlier (the paper's LLaMA setting).
    owl_m: float = setting(DEFAULT_M, "OWL: a Wanda score above M times its block's mean counts as an outlier")
    #: OWL's lambda: block ratios stay within +-lambda of the target.
    owl_lambda: float = setting(DEFAULT_LAMBDA, "OWL: block ratios stay within +-lambda of --sparsity_ratio")
    #: ATP's spread: the last block's ratio minus the first's (``wanda.pruning.profiles.atp_ratios``).
    atp_span: float = setting(
        0.16,
        "ATP: the last block's ratio minus the first's, the ratio rising linearly "
        "with depth around --sparsity_ratio (0.16: OWL's default spread, 2 x 0.08)",
    )

    targets: list[str] | None = setting(
        None,
        "prune only the matrices whose full name (model.layers.3.mlp.down_proj) matches one of these regular "
        "expressions (re.search); the others are reported as not pruned",
        metavar="REGEX",
    )
    ignore: list[str] | None = setting(
        None, "never prune the matrices whose full name matches one of these regular expressions", metavar="REGEX"
    )
    target_ratios: list[str] | None = setting(
        None,
        "REGEX=RATIO pairs: the matrices whose name matches REGEX are pruned to RATIO instead of the profile's "
        "ratio (first match wins; unstructured only); in a --config file, a mapping of REGEX to RATIO",
        metavar="REGEX=RATIO",
    )

    def __post_init__(self) -> None:
        require(
            self.prune_method in METHOD_SPECS,
            f"--prune_method must be one of {', '.join(METHOD_SPECS)}; got {self.prune_method!r}",
        )
        pattern = SparsityPattern.parse(self.sparsity_type)
        self._set("sparsity_ratio", pattern.resolve_ratio(self.sparsity_ratio))
        require(
            not self.use_variant or (self.prune_method == "wanda" and not pattern.is_nm),
            "--use_variant applies to --prune_method wanda with unstructured sparsity only",
        )
        for own in METHOD_SETTINGS:  # each method's checks of its own settings, and DSnoT's
            own.__post_init__(self)
        self._check_solvers(pattern)
        self._check_profile(pattern)
        self._check_dsnot()
        self._check_targets(pattern)

    def _check_solvers(self, pattern: SparsityPattern) -> None:
        """What only holds between a method's settings and the pattern."""
        require(
            not pattern.is_nm or self.blocksize % pattern.m == 0,
            f"--blocksize {self.blocksize} must be a multiple of M={pattern.m}",
        )

    def _check_profile(self, pattern: SparsityPattern) -> None:
        require(
            self.sparsity_profile in PROFILES,
            f"--sparsity_profile must be one of {', '.join(PROFILES)}; got {self.sparsity_profile!r}",
        )
        if self.sparsity_profile == "owl":
            require(
                not pattern.is_nm,
                f"--sparsity_profile owl is defined for unstructured sparsity only (every "
                f"layer of --sparsity_type {pattern} prunes exactly {pattern.n} of {pattern.m}); use uniform",
            )
            require(0 < self.owl_m < math.inf, f"--owl_m must be a positive number, got {self.owl_m}")
            require(
                0 < self.owl_lambda
                and self.owl_lambda <= self.sparsity_ratio
                and self.sparsity_ratio + self.owl_lambda < 1,
                f"--owl_lambda must be positive and keep every block's ratio in [0, 1): --sparsity_ratio "
                f"{self.sparsity_ratio:g} +- {self.owl_lambda:g}",
            )
        if self.sparsity_profile == "atp":
            require(
                not pattern.is_nm,
                f"--sparsity_profile atp is defined for unstructured sparsity only (every "
                f"layer of --sparsity_type {pattern} prunes exactly {pattern.n} of {pattern.m}); use uniform",
            )
            require(
                0 < self.atp_span
                and self.atp_span / 2 <= self.sparsity_ratio
                and self.sparsity_ratio + self.atp_span / 2 < 1,
                f"--atp_span must be positive and keep every block's ratio in [0, 1): --sparsity_ratio "
                f"{self.sparsity_ratio:g} +- {self.atp_span / 2:g}",
            )

    def _check_dsnot(self) -> None:
        if self.dsnot:
            require(
                self.prune_method in DSNOT_BASES and not self.use_variant,
                f"--dsnot follows --prune_method {', '.join(DSNOT_BASES)} (not the variant); got "
                f"{self.prune_method}{' --use_variant' if self.use_variant else ''}",
            )

    def _check_targets(self, pattern: SparsityPattern) -> None:
        self._set("target_ratios", [f"{r}={v}" for r, v in parse_ratio_pairs(self.target_ratios)] or None)
        require(
            not (self.target_ratios and pattern.is_nm),
            f"--target_ratios applies to unstructured sparsity (every layer of --sparsity_type {pattern} prunes "
            f"exactly {pattern.n} of {pattern.m}); use --targets / --ignore to leave matrices out",
        )
        self.matrix_targets  # compiles the regular expressions: a bad one is refused before any work

    @property
    def matrix_targets(self) -> MatrixTargets:
        """Which matrices are pruned and the per-pattern ratios (``wanda.models.targets``)."""
        return MatrixTargets(
            None if self.targets is None else tuple(self.targets),
            tuple(self.ignore or ()),
            parse_ratio_pairs(self.target_ratios),
        )

    @property
    def method(self) -> str:
        return self.prune_method

    def layer(self, ratio: float | None = None) -> LayerSettings:
        """What the method receives for one matrix: ``ratio`` (the profile's and the targets' choice for it,
        default ``sparsity_ratio``), the pattern and the method's own settings."""
        return get_method(self.prune_method).layer(self, ratio)

    @property
    def dsnot_settings(self) -> DsnotSettings | None:
        """DSnoT's settings when it runs after the method, else None."""
        return settings_from(DsnotSettings, self) if self.dsnot else None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "method": self.prune_method}
