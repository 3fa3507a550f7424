"""2:4 weights as PyTorch semi-structured sparse tensors (CUTLASS or cuSPARSELt kernels).

The pruning hands on dense weights with zeros; this module is the separate step that packs them. A weight
(out_features, in_features) qualifies when every group of 4 consecutive inputs of every row holds at most 2
non-zeros: the kernels keep exactly 2 values per group and would silently drop a third, so a weight that
violates the pattern is refused, naming the layer. The kernels also limit dtypes and shapes (per backend,
``_DTYPE_SHAPE_CONSTRAINTS`` in ``torch.sparse``); layers outside them stay dense and are reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..errors import WandaError
from ..masks import check_nm

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "MIN_CAPABILITY",
    "Converter",
    "SemiStructuredBackend",
    "SparsifyReport",
    "available_backends",
    "backend_problem",
    "check_24",
    "gpu_problem",
    "relative_error",
    "sparsify_linears",
]

BACKENDS = ("cutlass", "cusparselt")
#: Sparse tensor cores arrived with Ampere (sm_80).
MIN_CAPABILITY = (8, 0)
#: PyTorch's CUTLASS 2:4 kernels are built for sm_8x only ("Supported only on GPUs with compute capability
#: 8.x", seen on an H200); Hopper and later need cuSPARSELt.
CUTLASS_MAJOR = 8


def backend_problem(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (default: the current CUDA device), or ``None``."""
    problem = gpu_problem(device)
    if problem is not None:
        return problem
    if name == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this PyTorch build has no cuSPARSELt"
    if name == "cutlass":
        major, minor = torch.cuda.get_device_capability(torch.device(device if device is not None else "cuda"))
        if major != CUTLASS_MAJOR:
            return f"PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU has {major}.{minor}"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that run on ``device``, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if backend_problem(name, device) is None]


def gpu_problem(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 kernels cannot run on ``device`` (default: the current CUDA device), or ``None`` if they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None


def check_24(weight: torch.Tensor, name: str) -> None:
    """Raise unless every group of 4 consecutive inputs of every row of ``weight`` has at most 2 non-zeros."""
    if weight.dim() != 2:
        raise WandaError(f"layer {name}: a 2:4 weight must be a matrix, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 4:
        raise WandaError(f"layer {name}: {cols} input features are not a multiple of 4, so it cannot be 2:4 sparse")
    zeros = weight == 0
    if check_nm(zeros, 2, 4):
        return
    bad = zeros.reshape(rows, cols // 4, 4).sum(-1) < 2  # (rows, cols / 4): groups with more than 2 non-zeros
    row, group = (int(i) for i in bad.nonzero()[0])
    raise WandaError(
        f"layer {name} is not 2:4 sparse: {int(bad.sum())} of {bad.numel()} groups of 4 consecutive inputs keep "
        f"more than 2 weights (the first at row {row}, columns {4 * group}-{4 * group + 3}); prune the model with "
        "--sparsity_type 2:4 first"
    )


class Converter(Protocol):
    """What ``sparsify_linears`` needs from a backend; tests substitute a CPU stand-in."""

    name: str

    def problem(self, weight: torch.Tensor) -> str | None:
        """Why this backend's kernels cannot take ``weight`` (device, dtype, shape), or ``None``."""

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed tensor, used as ``nn.Linear.weight``."""


class SemiStructuredBackend:
    """``torch.sparse.SparseSemiStructuredTensor`` with an explicit backend (no global ``_FORCE_CUTLASS``)."""

    def __init__(self, name: str, device: torch.device | str | None = None):
        if name not in BACKENDS:
            raise WandaError(f"--backend must be one of {', '.join(BACKENDS)}; got {name!r}")
        problem = backend_problem(name, device) if torch.cuda.is_available() else None
        if problem is not None:
            others = [b for b in available_backends(device) if b != name]
            raise WandaError(f"--backend {name}: {problem}" + (f"; use --backend {others[0]}" if others else ""))
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        self.name = name
        self.tensor_class = (
            SparseSemiStructuredTensorCUTLASS if name == "cutlass" else SparseSemiStructuredTensorCUSPARSELT
        )

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(self.tensor_class._DTYPE_SHAPE_CONSTRAINTS)

    def problem(self, weight: torch.Tensor) -> str | None:
        if not weight.is_cuda:
            return f"on {weight.device}; the {self.name} kernels need a CUDA tensor"
        limits = self.tensor_class._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
        if limits is None:
            return f"dtype {weight.dtype} is not supported by {self.name} ({', '.join(map(str, self.dtypes))})"
        rows, cols = weight.shape
        if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            return (
                f"shape {rows}x{cols} is not a multiple of ({limits.sparse_min_rows}, {limits.sparse_min_cols}) "
                f"as {self.name} needs for {weight.dtype}"
            )
        return None

    def convert(self, weight: torch.Tensor) -> torch.Tensor:
        return self.tensor_class.from_dense(weight.detach().contiguous())


@dataclass
class SparsifyReport:
    backend: str
    converted: list[str] = field(default_factory=list)
    #: Layers left dense: name -> why the kernels cannot take them.
    skipped: dict[str, str] = field(default_factory=dict)
    #: Per converted layer: relative error ||Y_sparse - Y_dense|| / ||Y_dense|| on random inputs.
    layer_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_layer_error(self) -> tuple[str, float]:
        if not self.layer_errors:
            return "", 0.0
        name = max(self.layer_errors, key=self.layer_errors.get)
        return name, self.layer_errors[name]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F, in fp32."""
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-30))


@torch.no_grad()
def sparsify_linears(
    linears: dict[str, nn.Linear], backend: Converter, check_tokens: int = 64, seed: int = 0
) -> SparsifyReport:
    """Replace each layer's weight by its packed 2:4 form, in place.

    Every weight is checked for 2:4 first (all or nothing: a violation raises before any layer changes).
    With ``check_tokens > 0`` each converted layer's output on ``check_tokens`` random inputs is compared
    with the dense weight's and the relative error is recorded.
    """
    for name, layer in linears.items():
        check_24(layer.weight, name)
    report = SparsifyReport(backend.name)
    generator = torch.Generator().manual_seed(seed)
    for name, layer in linears.items():
        dense = layer.weight.detach()
        problem = backend.problem(dense)
        if problem is not None:
            report.skipped[name] = problem
            log.warning("layer %s stays dense: %s", name, problem)
            continue
        sparse = backend.convert(dense)
        if check_tokens > 0:
            x = torch.randn(check_tokens, dense.shape[1], generator=generator).to(dense.device, dense.dtype)
            report.layer_errors[name] = relative_error(nn.functional.linear(x, sparse), nn.functional.linear(x, dense))
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        report.converted.append(name)
    log.info(
        "converted %d linear layers to 2:4 (%s); %d left dense",
        len(report.converted),
        backend.name,
        len(report.skipped),
    )
    return report
