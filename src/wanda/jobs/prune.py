"""The original code's main job: load, calibrate, prune, evaluate, save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..data import calibration_windows, resolve_source
from ..engine.streaming import StreamSettings
from ..eval.zeroshot import ZERO_SHOT_FILE, ZeroShotSettings, run_zero_shot
from ..export.compressed_tensors import check_compressed_tensors
from ..models import ModelSettings
from ..models.checks import check_token_ids
from ..parallel.launch import DistributedSettings
from ..parallel.ranks import init_ranks
from ..pruning.handle import Output, open_model
from ..pruning.prune import check_quantization, needs_calibration
from ..pruning.prune_settings import PruneSettings
from ..pruning.streamed import default_work_dir
from ..quant.settings import QuantSettings
from ..utils.declare import SettingsMixin, require, require_seed, setting
from ..utils.io import ensure_free
from ..utils.overlap import check_disjoint
from ..utils.resources import run_peak_rss_mb
from ..utils.space import check_space
from .common import SOURCE_HELP, EvalSettings, LogSettings, ResultsSettings, report_prune_run

log = logging.getLogger("wanda")

#: Calibration windows when --nsamples is not given (the paper's 128).
DEFAULT_NSAMPLES = 128
#: The embedded default (no --model) follows the benchmark protocol's calibration (32 x 1024 tokens) and
#: evaluates 20 windows per set (the benchmark uses 40), so that dense and pruned perplexity on two sets fit a
#: first run's 15 minutes on 2 cores.
BUNDLED_DEFAULTS = {"nsamples": 32, "seqlen": 1024, "eval_windows": 20}


@dataclass(frozen=True)
class CalibrationSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "calibration"

    nsamples: int | None = setting(
        None, f"calibration windows (default: {DEFAULT_NSAMPLES}; {BUNDLED_DEFAULTS['nsamples']} for the bundled model)"
    )
    seed: int = setting(0, "seed of the calibration sampling")
    calib_dataset: str | None = setting(
        None, f"calibration text: {SOURCE_HELP} (default: c4; wiki-summaries for the bundled model)"
    )

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(self.nsamples is None or self.nsamples >= 1, f"--nsamples must be at least 1, got {self.nsamples}")


@dataclass(frozen=True)
class PruneOutputSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "outputs"

    eval_dense: bool = setting(False, "also evaluate the model before pruning (always for the bundled model)")
    save_model: str | None = setting(None, "folder to write the pruned model and tokenizer to")
    save_format: Literal["dense", "compressed", "gguf", "compressed-tensors"] = setting(
        "dense",
        "--save_model as a from_pretrained folder (dense), as non-zero values plus a bitmask "
        "(compressed; every wanda command and wanda.export.load_compressed read it), as one llama.cpp "
        "file model.gguf (gguf, with --gguf_type), or in compressed-tensors' pack-quantized layout for vLLM "
        "(compressed-tensors, with --wbits 4 or 8 and --sym)",
    )


#: The settings of ``wanda [flags]``, in the order their groups appear in ``--help``.
PRUNE_JOB = (
    ModelSettings,
    PruneSettings,
    QuantSettings,
    CalibrationSettings,
    EvalSettings,
    PruneOutputSettings,
    ResultsSettings,
    ZeroShotSettings,
    StreamSettings,
    DistributedSettings,
    LogSettings,
)


def _with_bundled_defaults(model: ModelSettings, calib: CalibrationSettings, evaluation: EvalSettings):
    if not model.bundled:
        return calib.replace(nsamples=calib.nsamples or DEFAULT_NSAMPLES), evaluation
    calib = calib.replace(nsamples=calib.nsamples or BUNDLED_DEFAULTS["nsamples"])
    evaluation = evaluation.replace(
        seqlen=evaluation.seqlen or BUNDLED_DEFAULTS["seqlen"],
        eval_windows=evaluation.eval_windows or BUNDLED_DEFAULTS["eval_windows"],
    )
    return calib, evaluation


def _check_outputs(
    model_settings: ModelSettings,
    settings: PruneSettings,
    quant: QuantSettings,
    calib_settings: CalibrationSettings,
    eval_settings: EvalSettings,
    outputs: PruneOutputSettings,
    results: ResultsSettings,
    zero_shot: ZeroShotSettings,
    stream: StreamSettings,
    is_main: bool,
) -> None:
    """Every output refused before any work: one that would write into an input, a results file or model
    folder that exists without --overwrite, a format without its settings."""
    method = settings.prune_method
    check_quantization(settings, quant)
    check_disjoint(
        {
            "--model": model_settings.model,
            "--calib_dataset": calib_settings.calib_dataset,
            "--eval_dataset": eval_settings.eval_dataset,
        },
        {
            "--save": results.save,
            "--save_model": outputs.save_model,
            "--work_dir": stream.work_dir,
            # a streamed run's default work folder sits beside --save_model (NAME.work): an input may be there
            "the work folder": None if stream.work_dir or stream.offload == "none" else _default_work(outputs),
            "--offload_activations": stream.offload_activations,
        },
    )
    require(
        (outputs.save_format == "gguf") == (quant.gguf_type is not None),
        "--save_format gguf and --gguf_type go together: pass both or neither",
    )
    require(
        outputs.save_format != "gguf" or outputs.save_model is not None,
        "--save_format gguf writes --save_model: pass the folder to write model.gguf to",
    )
    if outputs.save_format == "compressed-tensors":
        check_compressed_tensors(quant, outputs.save_model)
        require(
            stream.offload != "disk", "--save_format compressed-tensors needs the model in memory: pass --offload none"
        )
    if is_main:
        results.claim(
            f"log_{method}.txt", f"results_{method}.json", *([ZERO_SHOT_FILE] if zero_shot.eval_zero_shot else [])
        )
        if outputs.save_model:
            ensure_free(outputs.save_model, results.overwrite, "model folder")


def _default_work(outputs: PruneOutputSettings):
    return default_work_dir(outputs.save_model, {}) if outputs.save_model else None


def _calibration(
    handle, settings: PruneSettings, quant: QuantSettings, calib: CalibrationSettings, bundled: bool, seqlen: int,
    text_field: str,
):  # fmt: skip
    """The calibration windows, or None when nothing needs them (no statistics, DSnoT or profile walk)."""
    if not needs_calibration(settings, quant):
        return None
    spec = calib.calib_dataset or ("wiki-summaries" if bundled else "c4")
    source = resolve_source(spec, "calibration", text_field)
    ids = calibration_windows(source, handle.tokenizer, calib.nsamples, seqlen, calib.seed)
    log.info("calibration: %d windows of %d tokens from %s", ids.shape[0], seqlen, source.name)
    return ids


def _facts(
    model: ModelSettings, calib: CalibrationSettings, sets: list[str], seqlen: int, handle, start: float, ranks: int
) -> dict:
    """What the results file records about the run besides its report and perplexities."""
    return {
        "model": model.name,
        "seqlen": seqlen,
        "nsamples": calib.nsamples,
        "seed": calib.seed,
        "calib_dataset": calib.calib_dataset,
        "eval_dataset": sets,
        **handle.run_facts(),
        "total_wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": run_peak_rss_mb(),
        "ranks": ranks,
    }


def run_prune_job(
    model_settings: ModelSettings,
    settings: PruneSettings,
    quant: QuantSettings,
    calib_settings: CalibrationSettings,
    eval_settings: EvalSettings,
    outputs: PruneOutputSettings,
    results: ResultsSettings,
    zero_shot: ZeroShotSettings,
    stream: StreamSettings,
    dist_settings: DistributedSettings,
    logging_settings: LogSettings,
) -> int:
    # under torchrun: the ranks joined before the flags were read (``SINGLE``, all no-ops, without a launcher);
    # every step that can fail on one rank only runs inside ``ranks.agreed``, so that all of them stop together
    ranks = init_ranks(dist_settings)
    with ranks.agreed("checking the outputs and the device"):
        _check_outputs(
            model_settings, settings, quant, calib_settings, eval_settings, outputs, results, zero_shot, stream,
            ranks.is_main,
        )  # fmt: skip
        if ranks.distributed:  # one process per GPU: this rank's is GPU LOCAL_RANK (or the CPU with --device cpu)
            model_settings = model_settings.replace(device=str(ranks.select_device(model_settings.device)))
    calib_settings, eval_settings = _with_bundled_defaults(model_settings, calib_settings, eval_settings)
    start = time.perf_counter()
    torch.manual_seed(calib_settings.seed)
    handle = open_model(model_settings, stream, ranks, "--eval_zero_shot" if zero_shot.eval_zero_shot else None)
    with ranks.agreed("loading the model and the data"):
        handle.open()
        batch_size = eval_settings.batch_for(handle.device)
        seqlen = eval_settings.seqlen_for(handle)
        log.info("sequence length %d", seqlen)
        eval_windows = eval_settings.windows(eval_settings.specs(model_settings.bundled), handle.tokenizer, seqlen)
        calib = _calibration(
            handle, settings, quant, calib_settings, model_settings.bundled, seqlen, eval_settings.text_field
        )
        check_token_ids({**eval_windows, **({"calibration": calib} if calib is not None else {})}, handle.config)
        output = Output(outputs.save_model, outputs.save_format, results.overwrite, quant.gguf_type)
        if ranks.is_main:
            check_space(handle.space_needs(calib, settings, quant, output))

    evaluate_dense = outputs.eval_dense or model_settings.bundled
    dense = handle.perplexity(eval_windows, batch_size, "dense") if evaluate_dense else {}
    report = handle.prune(calib, settings, quant, batch_size, output, calib_settings.seed)
    pruned = handle.perplexity(eval_windows, batch_size, "pruned")
    handle.close()
    if not ranks.is_main:
        # one writer: every rank holds the same pruned weights; the main rank alone goes on (zero-shot tasks,
        # printing, writing) with no collective left, so a long zero-shot run never meets --dist_timeout
        return 0

    extra = _facts(model_settings, calib_settings, list(eval_windows), seqlen, handle, start, ranks.world_size)
    if zero_shot.eval_zero_shot:
        model = handle.whole_model("--eval_zero_shot")
        extra["zero_shot"] = run_zero_shot(
            model, handle.tokenizer, zero_shot, results.save, results.overwrite, logging_settings.verbose
        )
    report_prune_run(settings, model_settings.name, report, dense, pruned, extra, results, ranks.world_size)
    return 0
