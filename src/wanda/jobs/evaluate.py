"""``wanda eval``: perplexity and/or zero-shot accuracy of a saved model, without pruning it.

With ``--adapter`` the model is evaluated with a LoRA adapter attached unmerged (the original code's
``lora_ft/evaluate_ppl.py``); ``wanda finetune eval`` is this job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.streaming import OffloadSettings
from ..eval.zeroshot import ZERO_SHOT_FILE, ZeroShotSettings, linear_zero_counts, run_zero_shot
from ..masks import overall_sparsity
from ..models import ModelSettings
from ..utils.declare import SettingsMixin, require, setting
from ..utils.io import atomic_write_json, check_disjoint
from ..utils.resources import peak_rss_mb
from .common import EvalSettings, LogSettings, ResultsSettings, evaluate, print_perplexities

log = logging.getLogger("wanda")

RESULTS_FILE = "results_eval.json"


@dataclass(frozen=True)
class AdapterSettings(SettingsMixin):
    adapter: str | None = setting(
        None,
        "LoRA adapter folder (written by 'wanda finetune lora') to evaluate attached, unmerged",
        aliases=["--lora_weights"],
    )

    def __post_init__(self) -> None:
        require(
            self.adapter is None or (Path(self.adapter).expanduser() / "adapter_config.json").is_file(),
            f"{self.adapter} is not a LoRA adapter folder (no adapter_config.json); pass the --output_dir of "
            "'wanda finetune lora' or a checkpoint-N folder inside it",
        )


#: The settings of ``wanda eval``.
EVAL_JOB = (
    ModelSettings,
    AdapterSettings,
    EvalSettings,
    ZeroShotSettings,
    ResultsSettings,
    OffloadSettings,
    LogSettings,
)


def _attach_adapter(model, adapter: str):
    """The causal LM with the adapter's LoRA layers active inside it, so evaluation code needs no peft case."""
    from ..finetune import load_adapter

    peft_model = load_adapter(model, adapter)
    peft_model.eval()
    log.info("attached the LoRA adapter %s (unmerged)", adapter)
    return peft_model.get_base_model()


def run_eval_job(
    model_settings: ModelSettings,
    adapter: AdapterSettings,
    eval_settings: EvalSettings,
    zero_shot: ZeroShotSettings,
    results: ResultsSettings,
    offload: OffloadSettings,
    logging_settings: LogSettings,
) -> int:
    specs = eval_settings.specs(model_settings.bundled)
    require(
        bool(specs) or zero_shot.eval_zero_shot, "nothing to evaluate: --eval_dataset none without --eval_zero_shot"
    )
    check_disjoint(
        {"--model": model_settings.model, "--adapter": adapter.adapter, "--eval_dataset": specs},
        {"--save": results.save, "--offload_activations": offload.offload_activations},
    )
    results.claim(RESULTS_FILE, *([ZERO_SHOT_FILE] if zero_shot.eval_zero_shot else []))
    start = time.perf_counter()
    from ..data import resolve_source

    for spec in specs:  # a missing corpus fails before the model loads
        resolve_source(spec, "evaluation", eval_settings.text_field)

    from ..pruning.streamed import placement, streaming_folder  # --offload: evaluated block by block from disk

    streamable = adapter.adapter is None and not zero_shot.eval_zero_shot
    require(
        streamable or offload.offload != "disk",
        "--offload disk evaluates perplexity only: not with --adapter or --eval_zero_shot",
    )
    folder = (
        streaming_folder(model_settings.model, model_settings.cache_dir, *placement(model_settings), offload)
        if streamable
        else None
    )
    if folder is not None:
        from .streamed import streamed_eval_job

        return streamed_eval_job(
            folder,
            *placement(model_settings),
            model_settings.name,
            model_settings.bundled,
            eval_settings,
            results,
            offload,
            RESULTS_FILE,
        )

    loaded = model_settings.load()
    model, tokenizer = loaded.model, loaded.tokenizer
    seqlen = eval_settings.seqlen_for(model)
    counts = linear_zero_counts(model)  # of the base weights, before an adapter adds its own matrices
    sparsity = overall_sparsity(((size,), zeros / size) for zeros, size in counts.values())
    if adapter.adapter is not None:
        model = _attach_adapter(model, adapter.adapter)
    windows = eval_settings.windows(specs, tokenizer, seqlen)
    ppl = evaluate(model, windows, eval_settings.batch_for(next(model.parameters()).device), "eval")
    label = model_settings.name + (f" + adapter {adapter.adapter}" if adapter.adapter else "")
    print(f"\n{label}: linear-layer sparsity {sparsity:.4f}" + (" (of the base weights)" if adapter.adapter else ""))
    print_perplexities({"model": ppl}, seqlen)

    zero = None
    if zero_shot.eval_zero_shot:
        zero = run_zero_shot(model, tokenizer, zero_shot, results.save, results.overwrite, logging_settings.verbose)
    if results.save:
        payload = {
            "model": model_settings.name,
            "adapter": adapter.adapter,
            "linear_sparsity": sparsity,
            "seqlen": seqlen,
            "perplexity": ppl,
            "zero_shot": zero,
            "total_wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        atomic_write_json(Path(results.save) / RESULTS_FILE, payload, results.overwrite)
        log.info("results written to %s", results.save)
    return 0
