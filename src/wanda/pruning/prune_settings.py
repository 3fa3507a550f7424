"""The pruning method's settings, shared by the command line and the Python API."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..masks.pattern import PatternField, SparsityPattern
from ..methods.dsnot import DEFAULT_MAX_CYCLES, DEFAULT_THRESHOLD, DEFAULT_VAR_POWER
from ..methods.owl import DEFAULT_LAMBDA, DEFAULT_M
from ..methods.registry import DSNOT_BASES, METHOD_SPECS
from ..methods.ria import DEFAULT_A
from ..models.targets import MatrixTargets, parse_ratio_pairs
from ..utils.declare import SettingsMixin, require, setting
from .profiles import PROFILES

__all__ = ["SparsityPattern", "PruneSettings", "METHODS"]

#: Methods accepted by ``--prune_method``: the registry's names, in its order.
METHODS = tuple(METHOD_SPECS)


@dataclass(frozen=True)
class PruneSettings(PatternField, SettingsMixin):
    """What to prune and how. ``sparsity_ratio=None`` means N/M for N:M patterns and 0.5 for unstructured;
    after construction it holds the resolved ratio."""

    prune_method: str = setting("wanda", "pruning method", choices=METHODS)
    sparsity_ratio: float | None = setting(
        None, "fraction of weights to prune (default: 0.5 for unstructured, N/M for N:M, which it must equal)"
    )
    sparsity_type: str = setting("unstructured", "'unstructured' or N:M such as 2:4, 4:8")
    use_variant: bool = setting(
        False,
        "Wanda's appendix variant: per row, prune up to a cumulative-score "
        "threshold alpha * (row sum), alpha by bisection",
    )
    #: Columns per lazy OBS update (SparseGPT's B = 128); also the re-selection period of the ``iter`` ablations.
    blocksize: int = setting(128, "columns per lazy OBS update (SparseGPT's B); the iter ablations' period")
    #: Hessian dampening as a fraction of its mean diagonal (SparseGPT's 1%).
    percdamp: float = setting(0.01, "Hessian dampening, a fraction of its mean diagonal (SparseGPT's 1%%)")
    #: ADMM-Grad's penalty rho, relative to the mean diagonal of X^T X (Boza 2024 uses rho = 1 on the
    #: unit-diagonal Gram).
    admm_rho: float = setting(
        1.0,
        "ADMM-Grad (Boza 2024): penalty rho, relative to the mean diagonal of X^T X "
        "(the paper's rho = 1 on X^T X scaled to a unit diagonal)",
    )
    #: ADMM-Grad's iterations in all, and those over which the mask is tightened (Boza 2024: 20 and 15).
    admm_iterations: int = setting(20, "ADMM-Grad (Boza 2024): ADMM iterations in all")
    admm_ramp_iterations: int = setting(
        15,
        "ADMM-Grad (Boza 2024): the first iterations, over which the sparsity "
        "rises to the target along s (1 - (1 - k/K)^3) (the mask is fixed after)",
    )
    #: ALPS's initial penalty (relative to the mean diagonal) and its iteration cap (Meng et al. 2024).
    alps_rho: float = setting(
        0.1,
        "ALPS (Meng et al. 2024): initial penalty rho, relative to the mean diagonal "
        "of X^T X (scaled to a unit diagonal); it grows while the support changes",
    )
    alps_iterations: int = setting(
        300,
        "ALPS (Meng et al. 2024): at most this many ADMM iterations (it stops "
        "earlier once the support no longer changes)",
    )
    #: Conjugate-gradient iterations of the final least-squares update on the support (ADMM-Grad and ALPS).
    support_cg_iterations: int = setting(
        50,
        "ADMM-Grad and ALPS: preconditioned conjugate-gradient iterations "
        "of the final least-squares update on the support",
    )
    #: Relative tolerance of the Wanda variant's bisection on the achieved sparsity.
    variant_tolerance: float = setting(1e-3, "relative tolerance of the variant's bisection on the sparsity")
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
    #: RIA's exponent a of the activation norm.
    ria_a: float = setting(DEFAULT_A, "RIA: exponent a of the activation norm ||X_j||^a")
    dsnot: bool = setting(
        False,
        "after the method, DSnoT: swap pruned and kept weights within each row (each "
        "group of M) to shrink the expected output error; follows magnitude, wanda, ria, sparsegpt",
    )
    #: DSnoT's T: at most this many swaps per row.
    dsnot_max_cycles: int = setting(DEFAULT_MAX_CYCLES, "DSnoT: at most this many swap cycles per row")
    #: DSnoT's epsilon: a row stops once its expected error is this small.
    dsnot_threshold: float = setting(DEFAULT_THRESHOLD, "DSnoT: a row stops once |expected error| <= this")
    #: DSnoT's power of the input variance in the regrowing criterion.
    dsnot_var_power: float = setting(DEFAULT_VAR_POWER, "DSnoT: power of Var(x_j) dividing the regrowing score")
    dsnot_same_sign: bool = setting(
        False, "DSnoT (unstructured): also stop a row when a swap would flip the sign of its error (N:M always does)"
    )
    #: The reference code leaves the MLP alone by default (``--skip_layer mlp``).
    dsnot_skip: str = setting(
        "mlp",
        "DSnoT leaves the layers under this part of a block as the method left them",
        choices=("none", "mlp", "self_attn"),
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
        require(0 < self.variant_tolerance < 1, f"--variant_tolerance must be in (0, 1), got {self.variant_tolerance}")
        require(0 <= self.ria_a < math.inf, f"--ria_a must be a non-negative number, got {self.ria_a}")
        self._check_solvers(pattern)
        self._check_profile(pattern)
        self._check_dsnot()
        self._check_targets(pattern)

    def _check_solvers(self, pattern: SparsityPattern) -> None:
        """The OBS methods' (SparseGPT, the ablations) and ADMM-Grad's and ALPS's own settings."""
        require(self.blocksize >= 1, f"--blocksize must be at least 1, got {self.blocksize}")
        require(
            not pattern.is_nm or self.blocksize % pattern.m == 0,
            f"--blocksize {self.blocksize} must be a multiple of M={pattern.m}",
        )
        require(0 <= self.percdamp < 1, f"--percdamp must be in [0, 1), got {self.percdamp}")
        require(0 < self.admm_rho < math.inf, f"--admm_rho must be a positive number, got {self.admm_rho}")
        require(self.admm_iterations >= 1, f"--admm_iterations must be at least 1, got {self.admm_iterations}")
        require(
            self.admm_ramp_iterations >= 1,
            f"--admm_ramp_iterations must be at least 1, got {self.admm_ramp_iterations}",
        )
        require(0 < self.alps_rho < math.inf, f"--alps_rho must be a positive number, got {self.alps_rho}")
        require(self.alps_iterations >= 1, f"--alps_iterations must be at least 1, got {self.alps_iterations}")
        require(
            self.support_cg_iterations >= 0,
            f"--support_cg_iterations must be non-negative, got {self.support_cg_iterations}",
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
        require(self.dsnot_max_cycles >= 1, f"--dsnot_max_cycles must be at least 1, got {self.dsnot_max_cycles}")
        require(
            0 <= self.dsnot_threshold < math.inf,
            f"--dsnot_threshold must be a non-negative number, got {self.dsnot_threshold}",
        )
        require(
            0 <= self.dsnot_var_power < math.inf,
            f"--dsnot_var_power must be a non-negative number, got {self.dsnot_var_power}",
        )
        require(
            self.dsnot_skip in ("none", "mlp", "self_attn"),
            f"--dsnot_skip must be none, mlp or self_attn; got {self.dsnot_skip!r}",
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

    def to_dict(self) -> dict:
        return {**super().to_dict(), "method": self.prune_method}
