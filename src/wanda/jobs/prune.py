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
from ..export.compressed_tensors import QuantizedModel, check_compressed_tensors
from ..models import ModelSettings
from ..parallel.launch import DistributedSettings
from ..parallel.ranks import init_ranks
from ..pruning.prune import needs_calibration, prune
from ..pruning.prune_settings import PruneSettings
from ..quant.settings import QuantSettings
from ..utils.declare import SettingsMixin, require, require_seed, setting
from ..utils.io import check_disjoint, ensure_free
from ..utils.resources import run_peak_rss_mb
from .common import SOURCE_HELP, EvalSettings, LogSettings, ResultsSettings, evaluate, report_prune_run

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
    method = settings.prune_method
    with ranks.agreed("checking the outputs and the device"):
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
                stream.offload != "disk",
                "--save_format compressed-tensors needs the model in memory: pass --offload none",
            )
        if ranks.is_main:
            results.claim(
                f"log_{method}.txt", f"results_{method}.json", *([ZERO_SHOT_FILE] if zero_shot.eval_zero_shot else [])
            )
            if outputs.save_model:
                ensure_free(outputs.save_model, results.overwrite, "model folder")
        if ranks.distributed:  # one process per GPU: this rank's is GPU LOCAL_RANK (or the CPU with --device cpu)
            model_settings = model_settings.replace(device=str(ranks.select_device(model_settings.device)))
    calib_settings, eval_settings = _with_bundled_defaults(model_settings, calib_settings, eval_settings)
    start = time.perf_counter()
    torch.manual_seed(calib_settings.seed)

    from ..pruning.streamed import placement, streaming_folder  # --offload: the model streamed from disk block by block

    with ranks.agreed("choosing whether to stream the model"):
        folder = streaming_folder(model_settings.model, model_settings.cache_dir, *placement(model_settings), stream)
    # the free memory differs between machines: when one rank must stream, all of them do
    if folder is None and any(ranks.gather(folder is not None, "choosing whether to stream the model")):
        with ranks.agreed("choosing whether to stream the model"):
            folder = streaming_folder(
                model_settings.model,
                model_settings.cache_dir,
                *placement(model_settings),
                stream.replace(offload="disk"),
            )
            require(folder is not None, f"{model_settings.model} cannot be streamed here, but another rank streams it")
    if folder is not None:
        from .streamed import streamed_prune_job

        with ranks.agreed("checking the flags"):
            require(
                not zero_shot.eval_zero_shot, "--eval_zero_shot needs the whole model in memory: pass --offload none"
            )
        return streamed_prune_job(
            folder,
            *placement(model_settings),
            model_settings.name,
            model_settings.bundled,
            settings,
            calib_settings,
            eval_settings,
            outputs,
            results,
            stream,
            outputs.eval_dense or model_settings.bundled,
            ranks,
            quant=quant,
        )

    with ranks.agreed("loading the model and the data"):
        loaded = model_settings.load()
        model, tokenizer = loaded.model, loaded.tokenizer
        device = next(model.parameters()).device
        batch_size = eval_settings.batch_for(device)
        seqlen = eval_settings.seqlen_for(model)
        log.info("sequence length %d", seqlen)
        eval_windows = eval_settings.windows(eval_settings.specs(model_settings.bundled), tokenizer, seqlen)

        calib = None
        if needs_calibration(settings, quant):  # the method's statistics, DSnoT's or the sparsity profile's walk
            spec = calib_settings.calib_dataset or ("wiki-summaries" if model_settings.bundled else "c4")
            source = resolve_source(spec, "calibration", eval_settings.text_field)
            calib = calibration_windows(source, tokenizer, calib_settings.nsamples, seqlen, calib_settings.seed)
            log.info("calibration: %d windows of %d tokens from %s", calib.shape[0], seqlen, source.name)

    evaluate_dense = outputs.eval_dense or model_settings.bundled
    dense = evaluate(model, eval_windows, batch_size, "dense", ranks) if evaluate_dense else {}
    report = prune(model, calib, settings, device=device, batch_size=batch_size, ranks=ranks, quant=quant)
    pruned = evaluate(model, eval_windows, batch_size, "pruned", ranks)
    if not ranks.is_main:
        # one writer: every rank holds the same pruned weights; the main rank alone goes on (zero-shot tasks,
        # printing, writing) with no collective left, so a long zero-shot run never meets --dist_timeout
        return 0

    extra = {
        "model": model_settings.name,
        "seqlen": seqlen,
        "nsamples": calib_settings.nsamples,
        "seed": calib_settings.seed,
        "calib_dataset": calib_settings.calib_dataset,
        "eval_dataset": list(eval_windows),
        "total_wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": run_peak_rss_mb(),
        "ranks": ranks.world_size,
    }
    if zero_shot.eval_zero_shot:
        extra["zero_shot"] = run_zero_shot(
            model, tokenizer, zero_shot, results.save, results.overwrite, logging_settings.verbose
        )
    report_prune_run(settings, model_settings.name, report, dense, pruned, extra, results, ranks.world_size)
    if outputs.save_model:
        from ..export import save_model

        quantized = None
        if quant.wbits is not None:
            quantized = QuantizedModel(report.quantized, quant.wbits, quant.groupsize, quant.sym)
        save_model(
            model, tokenizer, outputs.save_model, outputs.save_format, results.overwrite, quant.gguf_type, quantized
        )
    return 0
