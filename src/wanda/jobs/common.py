"""Settings and steps that several jobs share: logging, where results go, and perplexity evaluation."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ..data import NAMED_SOURCES, evaluation_windows, resolve_source
from ..errors import WandaError
from ..models import check_seqlen, default_seqlen
from ..utils.declare import SettingsMixin, require, setting
from ..utils.devices import AUTO_BATCH, default_batch_size
from ..utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from ..pruning.prune import PruneReport
    from ..pruning.prune_settings import PruneSettings

log = logging.getLogger("wanda")

#: How the text sources are named in help texts, from the source registry.
SOURCE_HELP = f"{', '.join(NAMED_SOURCES)}, or a .txt/.raw/.json/.jsonl/.parquet file or folder"


@dataclass(frozen=True)
class LogSettings(SettingsMixin):
    verbose: bool = setting(False, "debug logging", aliases=["-v"])


@dataclass(frozen=True)
class ResultsSettings(SettingsMixin):
    _argument_group_name: ClassVar[str] = "results"

    save: str | None = setting(None, "folder for the results files (log_*.txt, results_*.json, zero_shot.json)")
    overwrite: bool = setting(False, "replace existing results; without it an existing result is never overwritten")

    def claim(self, *names: str) -> None:
        """Refuse existing result files before any long work starts."""
        from ..utils.io import ensure_free

        if self.save:
            for name in names:
                ensure_free(Path(self.save) / name, self.overwrite, "result")


@dataclass(frozen=True)
class TextSettings(SettingsMixin):
    text_field: str = setting("text", "field holding the text in json/jsonl/parquet records")


@dataclass(frozen=True)
class EvalSettings(TextSettings):
    """Perplexity evaluation: which sets, how many windows of how many tokens."""

    _argument_group_name: ClassVar[str] = "evaluation"

    eval_dataset: list[str] | None = setting(
        None,
        f"perplexity sets: {SOURCE_HELP}; or 'none' (default: wikitext2; for the bundled model the held-out "
        "wiki-summaries plus wikitext2 where available)",
    )
    eval_windows: int | None = setting(None, "evaluate on at most this many windows per set (default: all)")
    seqlen: int | None = setting(
        None, "tokens per window (default: min(model context, 2048))", aliases=["--ctx_length"]
    )
    batch_size: int | None = setting(
        None, "windows per forward pass (default: " + ", ".join(f"{n} on {k}" for k, n in AUTO_BATCH.items()) + ")"
    )

    def __post_init__(self) -> None:
        require(self.seqlen is None or self.seqlen >= 2, f"--seqlen must be at least 2, got {self.seqlen}")
        require(
            self.eval_windows is None or self.eval_windows >= 1,
            f"--eval_windows must be at least 1, got {self.eval_windows}",
        )
        require(
            self.batch_size is None or self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}"
        )

    def specs(self, bundled: bool) -> list[str]:
        """The sets to evaluate; the bundled model's default adds WikiText-2 only where it is available."""
        if self.eval_dataset:
            if [s.lower() for s in self.eval_dataset] == ["none"]:
                return []
            return [s for item in self.eval_dataset for s in item.split(",") if s]
        if not bundled:
            return ["wikitext2"]
        try:
            resolve_source("wikitext2", "evaluation")
            return ["wiki-summaries", "wikitext2"]
        except WandaError:
            log.info(
                "WikiText-2 is not available offline (set WANDA_DATA_DIR to a folder with wikitext-2-raw/); "
                "evaluating on the held-out summaries only"
            )
            return ["wiki-summaries"]

    def seqlen_for(self, model) -> int:
        """``--seqlen`` or the model's default, checked against its context; ``model``: anything with the
        model's ``config`` (a loaded model or a ``wanda.pruning.handle.ModelHandle``)."""
        seqlen = self.seqlen or default_seqlen(model)
        check_seqlen(model, seqlen)  # beyond the context: positions the model never saw, or an index error
        return seqlen

    def batch_for(self, device: torch.device) -> int:
        return self.batch_size or default_batch_size(device)

    def windows(self, specs: list[str], tokenizer, seqlen: int) -> dict[str, torch.Tensor]:
        out = {}
        for spec in specs:
            source = resolve_source(spec, "evaluation", self.text_field)
            out[_label(source.name, spec, out)] = evaluation_windows(source, tokenizer, seqlen, self.eval_windows)
        return out


def _label(name: str, spec: str, taken: dict) -> str:
    """A row label no other set has: the source's name, else the path as given (two ``wiki.txt`` files from
    two folders), else that with a count, so that no result replaces another."""
    for label in (name, spec):
        if label not in taken:
            return label
    count = 2
    while f"{spec} ({count})" in taken:
        count += 1
    return f"{spec} ({count})"


def print_perplexities(columns: dict[str, dict[str, float]], seqlen: int) -> None:
    """One markdown table: a row per evaluation set, a column per model state (dense, pruned, ...)."""
    if not any(columns.values()):
        return
    sets = list(dict.fromkeys(name for values in columns.values() for name in values))
    print(f"| eval set (seqlen {seqlen}) | " + " | ".join(f"{c} ppl" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in sets:
        print(
            f"| {name} | "
            + " | ".join(f"{columns[c][name]:.3f}" if name in columns[c] else "-" for c in columns)
            + " |"
        )
    sys.stdout.flush()


def write_results(
    results: ResultsSettings, method: str, report: PruneReport, dense: dict, pruned: dict, extra: dict
) -> None:
    save = Path(results.save)
    names = list(pruned)
    header = ["method", "actual_sparsity", "ppl_test"] + [f"ppl_{n}" for n in names[1:]]
    row = (
        [method, f"{report.actual_sparsity:.4f}"] + [f"{pruned[n]:.4f}" for n in names] + (["nan"] if not names else [])
    )
    atomic_write_text(save / f"log_{method}.txt", "\t".join(header) + "\n" + "\t".join(row) + "\n", results.overwrite)
    payload = {"prune": report.to_dict(), "perplexity": {"dense": dense, "pruned": pruned}, **extra}
    atomic_write_json(save / f"results_{method}.json", payload, results.overwrite)


def report_prune_run(
    settings: PruneSettings,
    model_name: str,
    report: PruneReport,
    dense: dict,
    pruned: dict,
    extra: dict,
    results: ResultsSettings,
    world_size: int = 1,
) -> None:
    """What every prune run ends with, resident or streamed: the summary line, the perplexity table and the
    results files."""
    where = " (streamed)" if extra.get("streamed") else ""
    print(
        f"\n{settings.prune_method} {settings.pattern} (ratio {settings.sparsity_ratio:g}) on {model_name}{where}: "
        f"actual sparsity {report.actual_sparsity:.4f}, pruning {report.prune_seconds:.1f}s (mask and update), "
        f"{report.wall_seconds:.1f}s wall" + (f" over {world_size} ranks" if world_size > 1 else "")
    )
    print_perplexities({"dense": dense, "pruned": pruned} if dense else {"pruned": pruned}, extra["seqlen"])
    sys.stdout.flush()
    if results.save:
        write_results(results, settings.prune_method, report, dense, pruned, extra)
        log.info("results written to %s", results.save)
