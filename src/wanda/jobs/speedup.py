"""``wanda speedup``: inference speed-up of a pruned model.

On CUDA (the default) a 2:4-pruned model on PyTorch's semi-structured sparse kernels; with ``--device cpu``
any pruned model on the sparse CPU kernel (``wanda.kernels.SparseLinear``) against its dense-with-zeros self.

Exit codes: 0 done and the output check passed; 2 a usage or input error (e.g. the model is not 2:4 sparse);
3 no CUDA GPU of compute capability 8.0 or higher (one line on stderr, nothing else done);
4 the sparse model's outputs differ from the dense model's beyond the tolerance (results are still written).
"""

from __future__ import annotations

import logging
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import WandaError
from ..eval.cpu_speed import CpuSpeedSettings, cpu_name, format_cpu_tables, run_cpu_speedup
from ..export.semi_structured import (
    BACKENDS,
    MIN_CAPABILITY,
    SemiStructuredBackend,
    available_backends,
    backend_problem,
    gpu_problem,
)
from ..export.speedup import SpeedupSettings, format_tables, run_speedup
from ..models.loading import TrustSettings
from ..utils.declare import setting
from ..utils.io import atomic_write_json, ensure_free
from .common import LogSettings

log = logging.getLogger("wanda")

EXIT_NO_GPU = 3
EXIT_CHECK_FAILED = 4
EPILOG = (
    f"exit codes: 0 ok; 2 usage or input error; {EXIT_NO_GPU} no CUDA GPU of compute capability "
    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; {EXIT_CHECK_FAILED} outputs differ beyond the tolerance "
    "(results still written)"
)


class NoSparseGpu(WandaError):
    exit_code = EXIT_NO_GPU


@dataclass(frozen=True)
class SpeedupJobSettings(TrustSettings):
    model: str = setting(help="a 2:4-pruned model: from_pretrained folder, compressed folder, hub id, or smollm2-135m")
    backend: str = setting(
        "auto", "sparse kernels (auto: cutlass on compute capability 8.x, else cusparselt)", choices=("auto", *BACKENDS)
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = setting(
        "auto", "weights and activations (auto: float16 on CUDA, float32 on cpu; cuSPARSELt has no float32)"
    )
    device: str = setting(
        "cuda",
        "CUDA device (cuda: the current one) for the 2:4 kernels, or cpu for the sparse CPU kernel "
        "(any pruning pattern; dense and sparse-kernel decode, prefill and peak RSS)",
    )
    cache_dir: str = setting("llm_weights", "where hub weights are downloaded")
    output: str | None = setting(None, "JSON file for the results (default: speedup_<gpu>_<backend>.json)")
    overwrite: bool = setting(False, "replace an existing --output")

    def __post_init__(self) -> None:
        try:
            torch.device(self.device)
        except RuntimeError:
            raise WandaError(f"--device {self.device!r} is not a device (e.g. cuda, cuda:1)") from None


#: The settings of ``wanda speedup``.
SPEEDUP_JOB = (SpeedupJobSettings, SpeedupSettings, CpuSpeedSettings, LogSettings)


def gpu_slug(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``, for file names."""
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia ")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device: torch.device) -> dict:
    return {
        "gpu": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cusparselt": torch.backends.cusparselt.is_available(),
    }


def run_cpu_speedup_job(job: SpeedupJobSettings, cpu: CpuSpeedSettings) -> int:
    """Dense against ``SparseLinear`` on the CPU: per matrix shape in this process, whole model per process."""
    folder = Path(job.model).expanduser()
    if not folder.is_dir():
        raise WandaError(
            f"--device cpu measures a saved pruned model folder (compressed or dense); {job.model} is not one"
        )
    dtype = "float32" if job.dtype == "auto" else job.dtype
    if dtype == "float16":
        raise WandaError("the sparse CPU kernel runs float32 or bfloat16; use --dtype float32 or bfloat16")
    output = Path(job.output or "speedup_cpu.json")
    ensure_free(output, job.overwrite, "result")
    result = run_cpu_speedup(str(folder), dtype, cpu)
    result["environment"] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": job.model,
        "dtype": dtype,
    }
    print(format_cpu_tables(result, f"sparse CPU kernel against dense, {job.model} ({dtype})"))
    atomic_write_json(output, result, job.overwrite)
    log.info("results written to %s", output)
    return 0


def run_speedup_job(
    job: SpeedupJobSettings, settings: SpeedupSettings, cpu: CpuSpeedSettings, logging_settings: LogSettings
) -> int:
    from ..models import load_model

    if torch.device(job.device).type == "cpu":
        return run_cpu_speedup_job(job, cpu)
    problem = gpu_problem(job.device)
    if problem is not None:
        raise NoSparseGpu(
            f"2:4 sparse kernels need a CUDA GPU of compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; {problem}"
        )
    device = torch.device(job.device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = job.backend
    if name == "auto":
        usable = available_backends(device)
        if not usable:
            raise WandaError(f"no 2:4 backend runs here: {backend_problem('cusparselt', device)}")
        name = usable[0]
    backend = SemiStructuredBackend(name, device)
    output = Path(job.output or f"speedup_{gpu_slug(device)}_{name}.json")
    ensure_free(output, job.overwrite, "result")
    loaded = load_model(
        job.model,
        job.cache_dir,
        "float16" if job.dtype == "auto" else job.dtype,
        str(device),
        trust_remote_code=job.trust_remote_code,
        allow_pickle=job.allow_pickle,
    )
    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")
    result = run_speedup(loaded.model, backend, settings)
    result.environment = {**environment(device), "model": job.model}
    print(format_tables(result, f"2:4 speed-up of {job.model}"))
    atomic_write_json(output, result.to_dict(), job.overwrite)
    log.info("results written to %s", output)
    if not result.check.passed:
        print(f"{job.model}: sparse outputs differ from dense beyond the tolerance (see above)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0
