"""``wanda speedup``: inference speed-up of a 2:4-pruned model from PyTorch's semi-structured sparse kernels.

Exit codes: 0 done and the output check passed; 2 a usage or input error (e.g. the model is not 2:4 sparse);
3 no CUDA GPU of compute capability 8.0 or higher (one line on stderr, nothing else done);
4 the sparse model's outputs differ from the dense model's beyond the tolerance (results are still written).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from ..errors import WandaError
from ..export.semi_structured import (BACKENDS, MIN_CAPABILITY, SemiStructuredBackend, available_backends,
                                      backend_problem, gpu_problem)
from ..export.speedup import SpeedupSettings, format_tables, run_speedup
from ..io import atomic_write_json, ensure_free
from .common import Parser, guarded, setup_logging

log = logging.getLogger("wanda")

EXIT_NO_GPU = 3
EXIT_CHECK_FAILED = 4
_DEFAULTS = SpeedupSettings()


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts such as 1,4,16; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts such as 1,4,16; got {text!r}")
    return values


def _joined(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def build_parser(prog: str) -> Parser:
    p = Parser(prog=prog, description="Measure the inference speed-up of a 2:4-pruned model (prune it with "
               "--sparsity_type 2:4 --save_model DIR first): convert its linear layers to semi-structured sparse "
               "tensors, check the outputs against the dense model, and time both.",
               epilog=f"exit codes: 0 ok; 2 usage or input error; {EXIT_NO_GPU} no CUDA GPU of compute capability "
               f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; {EXIT_CHECK_FAILED} outputs differ beyond the "
               "tolerance (results still written)")
    p.add_argument("--model", required=True, help="a 2:4-pruned model: from_pretrained folder, compressed folder, "
                   "hub id, or smollm2-135m")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="sparse kernels (default: auto: cutlass on compute capability 8.x, else cusparselt)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="weights and activations (default: float16; cuSPARSELt has no float32)")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda, the current one)")
    p.add_argument("--cache_dir", default="llm_weights", help="where hub weights are downloaded")
    p.add_argument("--decode_tokens", type=_counts, default=_DEFAULTS.decode_tokens,
                   help=f"matmul token counts for decode (default: {_joined(_DEFAULTS.decode_tokens)})")
    p.add_argument("--prefill_tokens", type=_counts, default=_DEFAULTS.prefill_tokens,
                   help=f"matmul token counts for prefill (default: {_joined(_DEFAULTS.prefill_tokens)})")
    p.add_argument("--model_tokens", type=_counts, default=_DEFAULTS.model_tokens,
                   help=f"sequence lengths of the whole-model forward (default: {_joined(_DEFAULTS.model_tokens)})")
    p.add_argument("--iters", type=int, default=_DEFAULTS.iters, help=f"timed calls per matmul (default: {_DEFAULTS.iters})")
    p.add_argument("--model_iters", type=int, default=_DEFAULTS.model_iters,
                   help=f"timed whole-model forwards (default: {_DEFAULTS.model_iters})")
    p.add_argument("--layer_rtol", type=float, default=_DEFAULTS.layer_rtol,
                   help=f"largest relative error of a layer's output (default: {_DEFAULTS.layer_rtol:g})")
    p.add_argument("--model_rtol", type=float, default=_DEFAULTS.model_rtol,
                   help=f"largest relative error of the logits (default: {_DEFAULTS.model_rtol:g})")
    p.add_argument("--output", default=None, help="JSON file for the results (default: speedup_<gpu>_<backend>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def gpu_slug(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``, for file names."""
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia ")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device: torch.device) -> dict:
    return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cusparselt": torch.backends.cusparselt.is_available()}


def run(args) -> int:
    from ..models import load_model

    setup_logging(args.verbose)
    settings = SpeedupSettings(decode_tokens=args.decode_tokens, prefill_tokens=args.prefill_tokens,
                               model_tokens=args.model_tokens, iters=args.iters, model_iters=args.model_iters,
                               layer_rtol=args.layer_rtol, model_rtol=args.model_rtol).validate()
    device = torch.device(args.device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = args.backend
    if name == "auto":
        usable = available_backends(device)
        if not usable:
            raise WandaError(f"no 2:4 backend runs here: {backend_problem('cusparselt', device)}")
        name = usable[0]
    backend = SemiStructuredBackend(name, device)
    output = Path(args.output or f"speedup_{gpu_slug(device)}_{name}.json")
    ensure_free(output, args.overwrite, "result")
    loaded = load_model(args.model, args.cache_dir, args.dtype, str(device))
    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor.*prototype.*")
    result = run_speedup(loaded.model, backend, settings)
    result.environment = {**environment(device), "model": args.model}
    print(format_tables(result, f"2:4 speed-up of {args.model}"))
    atomic_write_json(output, result.to_dict(), args.overwrite)
    log.info("results written to %s", output)
    if not result.check.passed:
        print(f"{args.model}: sparse outputs differ from dense beyond the tolerance (see above)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def main(argv: list[str], prog: str) -> NoReturn:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device (e.g. cuda, cuda:1)")
    problem = gpu_problem(args.device)
    if problem is not None:
        print(f"{prog}: 2:4 sparse kernels need a CUDA GPU of compute capability "
              f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher; {problem}", file=sys.stderr)
        sys.exit(EXIT_NO_GPU)
    guarded(lambda: run(args), prog)
