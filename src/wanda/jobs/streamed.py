"""The pruning and evaluation jobs when the model is streamed from disk (``--offload``, ``wanda.pruning.streamed``).

``wanda`` and ``wanda eval`` call these instead of loading the model when ``streaming_folder`` says so: the
checkpoint is a safetensors folder and either ``--offload disk`` or it would not fit in memory. Same flags, same
printed tables and results files as the in-memory jobs; perplexity is computed block by block.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..data import calibration_windows, resolve_source
from ..engine.streaming import OffloadSettings, StreamSettings
from ..errors import WandaError
from ..eval.streamed import streamed_perplexity
from ..models import default_seqlen
from ..models.streaming import build_skeleton
from ..parallel.ranks import SINGLE, Ranks
from ..pruning.prune import needs_calibration
from ..pruning.prune_settings import PruneSettings
from ..pruning.streamed import open_pruned, prune_streamed, streamed_linear_sparsity
from ..quant.settings import QuantSettings
from ..utils.io import atomic_write_json
from ..utils.resources import peak_rss_mb, run_peak_rss_mb
from .common import EvalSettings, print_perplexities, report_prune_run

log = logging.getLogger("wanda")

__all__ = ["streamed_prune_job", "streamed_eval_job"]


def _tokenizer_and_seqlen(folder: Path, eval_settings: EvalSettings):
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise WandaError(f"could not load the tokenizer of {folder}: {exc}".splitlines()[0]) from exc
    seqlen = eval_settings.seqlen or default_seqlen(SimpleNamespace(config=AutoConfig.from_pretrained(folder)))
    return tokenizer, seqlen


def _evaluate(
    folder_or_model,
    windows: dict[str, torch.Tensor],
    dtype,
    device,
    batch_size: int,
    offload: OffloadSettings,
    ranks: Ranks = SINGLE,
) -> dict[str, float]:
    activations = Path(offload.offload_activations) if offload.offload_activations else None
    out = {}
    for name, w in windows.items():
        streamed = (
            build_skeleton(folder_or_model, dtype, device) if isinstance(folder_or_model, Path) else folder_or_model
        )
        out[name] = streamed_perplexity(streamed, w, device, batch_size, activations=activations, ranks=ranks)
    return out


def streamed_prune_job(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    model_name: str,
    bundled: bool,
    settings: PruneSettings,
    calib_settings,
    eval_settings: EvalSettings,
    outputs,
    results,
    stream: StreamSettings,
    eval_dense: bool,
    ranks: Ranks = SINGLE,
    quant: QuantSettings | None = None,
) -> int:
    """``wanda`` with the model streamed: calibrate, prune block by block (resumable), save, evaluate. Under
    torchrun every rank streams every block with its share of the windows; the main rank alone prints and
    writes."""
    start = time.perf_counter()
    with ranks.agreed("loading the tokenizer and the data"):
        tokenizer, seqlen = _tokenizer_and_seqlen(folder, eval_settings)
        log.info("sequence length %d", seqlen)
        batch_size = eval_settings.batch_for(device)
        eval_windows = eval_settings.windows(eval_settings.specs(bundled), tokenizer, seqlen)
        calib = None
        if needs_calibration(settings, quant):  # the method's statistics, DSnoT's or the sparsity profile's walk
            spec = calib_settings.calib_dataset or ("wiki-summaries" if bundled else "c4")
            source = resolve_source(spec, "calibration", eval_settings.text_field)
            calib = calibration_windows(source, tokenizer, calib_settings.nsamples, seqlen, calib_settings.seed)
            log.info("calibration: %d windows of %d tokens from %s", calib.shape[0], seqlen, source.name)

    dense = _evaluate(folder, eval_windows, dtype, device, batch_size, stream, ranks) if eval_dense else {}
    run = prune_streamed(
        folder,
        calib,
        settings,
        stream,
        outputs.save_model,
        device,
        dtype,
        batch_size,
        overwrite=results.overwrite,
        seed=calib_settings.seed,
        tokenizer=tokenizer,
        cleanup=False,
        save_format=outputs.save_format,
        ranks=ranks,
        progress=ranks.is_main,
        quant=quant,
    )
    pruned = (
        _evaluate(open_pruned(run, device), eval_windows, dtype, device, batch_size, stream, ranks)
        if eval_windows
        else {}
    )
    run.cleanup()  # after the evaluation: a crash there resumes at the end of the walk
    if not ranks.is_main:
        return 0
    report = run.report
    extra = {
        "model": model_name,
        "seqlen": seqlen,
        "nsamples": calib_settings.nsamples,
        "seed": calib_settings.seed,
        "calib_dataset": calib_settings.calib_dataset,
        "eval_dataset": list(eval_windows),
        "streamed": True,
        "resumed_from_block": run.resumed_from,
        "total_wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": run_peak_rss_mb(),
        "ranks": ranks.world_size,
    }
    report_prune_run(settings, model_name, report, dense, pruned, extra, results, ranks.world_size)
    return 0


def streamed_eval_job(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    model_name: str,
    bundled: bool,
    eval_settings: EvalSettings,
    results,
    offload: OffloadSettings,
    results_file: str,
) -> int:
    """``wanda eval`` with the model streamed: linear-layer sparsity and perplexity, one block resident at a time."""
    start = time.perf_counter()
    tokenizer, seqlen = _tokenizer_and_seqlen(folder, eval_settings)
    windows = eval_settings.windows(eval_settings.specs(bundled), tokenizer, seqlen)
    sparsity = streamed_linear_sparsity(build_skeleton(folder, dtype, "cpu", with_head=False))
    ppl = _evaluate(folder, windows, dtype, device, eval_settings.batch_for(device), offload)
    print(f"\n{model_name} (streamed): linear-layer sparsity {sparsity:.4f}")
    print_perplexities({"model": ppl}, seqlen)
    if results.save:
        payload = {
            "model": model_name,
            "adapter": None,
            "linear_sparsity": sparsity,
            "seqlen": seqlen,
            "perplexity": ppl,
            "zero_shot": None,
            "streamed": True,
            "total_wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        atomic_write_json(Path(results.save) / results_file, payload, results.overwrite)
        log.info("results written to %s", results.save)
    return 0
