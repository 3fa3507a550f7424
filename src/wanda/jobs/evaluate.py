"""``wanda eval``: perplexity and/or zero-shot accuracy of a saved model, without pruning it.

With ``--adapter`` the model is evaluated with a LoRA adapter attached unmerged (the original code's
``lora_ft/evaluate_ppl.py``); ``wanda finetune eval`` is this job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import resolve_source
from ..engine.streaming import OffloadSettings
from ..eval.zeroshot import ZERO_SHOT_FILE, ZeroShotSettings, run_zero_shot
from ..models import ModelSettings, SparseKernelSettings
from ..models.checks import check_token_ids
from ..pruning.handle import open_model
from ..utils.declare import SettingsMixin, require, setting
from ..utils.io import atomic_write_json
from ..utils.overlap import check_disjoint
from ..utils.resources import peak_rss_mb
from .common import EvalSettings, LogSettings, ResultsSettings, print_perplexities

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
    SparseKernelSettings,
    AdapterSettings,
    EvalSettings,
    ZeroShotSettings,
    ResultsSettings,
    OffloadSettings,
    LogSettings,
)


def densify_adapter_targets(model, adapter: str) -> int:
    """Turn back into ``nn.Linear`` the ``SparseLinear`` layers the adapter wraps; returns how many.

    peft wraps only the layer types it knows, so the layers a LoRA adapter targets are made dense (their
    weight is the packed one, bit for bit); every other pruned layer keeps the sparse kernel.
    """
    import json
    import re

    from torch import nn

    from ..kernels import SparseLinear

    config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, SparseLinear):
            continue
        leaf = name.rpartition(".")[2]
        hit = re.fullmatch(targets, name) if isinstance(targets, str) else (leaf in targets or name in targets)
        if not hit:
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight = nn.Parameter(module.to_dense(), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.to(dense.weight.dtype), requires_grad=False)
        parent_name = name.rpartition(".")[0]
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, dense)
        count += 1
    return count


def _attach_adapter(model, adapter: str):
    """The causal LM with the adapter's LoRA layers active inside it, so evaluation code needs no peft case."""
    from ..finetune import load_adapter

    densified = densify_adapter_targets(model, adapter)
    if densified:
        log.info("%d sparse-kernel layers targeted by the adapter made dense for peft", densified)

    peft_model = load_adapter(model, adapter)
    peft_model.eval()
    log.info("attached the LoRA adapter %s (unmerged)", adapter)
    return peft_model.get_base_model()


def _whole_for(adapter: bool, zero_shot: bool, sparse_kernel: bool) -> str | None:
    """The flags that keep the model resident (``open_model``'s ``whole_for``), or None."""
    flags = [("--adapter", adapter), ("--eval_zero_shot", zero_shot), ("--sparse_kernel", sparse_kernel)]
    return " and ".join(flag for flag, given in flags if given) or None


def run_eval_job(
    model_settings: ModelSettings,
    sparse: SparseKernelSettings,
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
    for spec in specs:  # a missing corpus fails before the model loads
        resolve_source(spec, "evaluation", eval_settings.text_field)

    whole_for = _whole_for(adapter.adapter is not None, zero_shot.eval_zero_shot, sparse.sparse_kernel)
    kernel = {"sparse_kernel": sparse.sparse_kernel, "sparse_values": sparse.sparse_values}
    handle = open_model(model_settings, offload, whole_for=whole_for, **kernel)
    handle.open()
    seqlen = eval_settings.seqlen_for(handle)
    sparsity = handle.zero_share()  # of the base weights, before an adapter adds its own matrices
    if adapter.adapter is not None:
        handle.model = _attach_adapter(handle.model, adapter.adapter)
    windows = eval_settings.windows(specs, handle.tokenizer, seqlen)
    check_token_ids(windows, handle.config)
    ppl = handle.perplexity(windows, eval_settings.batch_for(handle.device), "eval")
    label = model_settings.name + (f" + adapter {adapter.adapter}" if adapter.adapter else "")
    label += " (streamed)" if handle.streamed else ""
    print(f"\n{label}: linear-layer sparsity {sparsity:.4f}" + (" (of the base weights)" if adapter.adapter else ""))
    print_perplexities({"model": ppl}, seqlen)

    zero = None
    if zero_shot.eval_zero_shot:
        model = handle.whole_model("--eval_zero_shot")
        zero = run_zero_shot(
            model, handle.tokenizer, zero_shot, results.save, results.overwrite, logging_settings.verbose
        )
    if results.save:
        payload = {
            "model": model_settings.name,
            "adapter": adapter.adapter,
            "linear_sparsity": sparsity,
            "seqlen": seqlen,
            "perplexity": ppl,
            "zero_shot": zero,
            **handle.run_facts(),
            "total_wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": peak_rss_mb(),
        }
        atomic_write_json(Path(results.save) / RESULTS_FILE, payload, results.overwrite)
        log.info("results written to %s", results.save)
    return 0
