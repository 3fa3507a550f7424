"""Zero-shot accuracy of a model held in memory, with the released lm-evaluation-harness (``lm-eval``).

The model object that was just pruned is wrapped in the harness's ``HFLM`` and evaluated as it is: nothing
is saved or reloaded, and the zeros of every linear layer are counted before and after (they must not move).

Tasks come from one of two places:

* the hub: the harness's own task of that name (``boolq``, ``arc_easy``, ...), downloaded by ``datasets``;
* a local folder (``data_dir``): the task configs in ``wanda/eval/tasks/*.yaml``. Each is the harness's own
  config for that task (same prompt, choices, metrics) with its ``dataset_path`` pointed at a local
  json/jsonl/text file; where the file's layout differs from the hub's, its ``process_docs`` converts the rows
  (``wanda/eval/tasks/convert.py``). The default seven are the tasks of the Wanda paper's table.

Tasks named that have no local config are taken from the hub even when ``data_dir`` is set (and logged).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import WandaError
from ..models import model_zero_counts
from ..utils.declare import SettingsMixin, require, setting
from ..utils.hub import hub_problem
from ..utils.io import atomic_write_json
from .local_tasks import TASKS_DIR, local_task_config, local_task_files, local_task_names, resolve_data_dir

__all__ = [
    "PAPER_TASKS",
    "TASKS_DIR",
    "ZeroShotSettings",
    "ZeroShotResult",
    "resolve_data_dir",
    "local_task_names",
    "local_task_config",
    "evaluate_zero_shot",
    "format_table",
    "linear_zero_counts",
    "run_zero_shot",
]

log = logging.getLogger(__name__)

#: The seven tasks of the Wanda paper's zero-shot table (the original code's defaults).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: Written into ``--save`` beside the job's own results.
ZERO_SHOT_FILE = "zero_shot.json"


@dataclass(frozen=True)
class ZeroShotSettings(SettingsMixin):
    """What to evaluate and how (the ``--eval_zero_shot`` flags)."""

    _argument_group_name: ClassVar[str] = "zero-shot evaluation"

    eval_zero_shot: bool = setting(False, "run the zero-shot tasks (lm-eval) on the model in memory")
    tasks: str | None = setting(
        None, f"comma-separated lm-eval tasks (default: the paper's seven: {','.join(PAPER_TASKS)})"
    )
    num_fewshot: int = setting(0, "examples in each prompt")
    limit: int | None = setting(None, "evaluate only the first N documents of each task, for quick runs (default: all)")
    eval_batch_size: str = setting(
        "8", "requests per forward pass, or 'auto' (GPU only: the harness searches for the largest batch that fits)"
    )
    zero_shot_data: str | None = setting(
        None,
        "folder with local copies of the task files (layout of shared/data/zeroshot), or 'hub' to download "
        "them (default: $WANDA_DATA_DIR/zeroshot if it exists, else the hub)",
    )

    def __post_init__(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--tasks", self.tasks),
                ("--limit", self.limit),
                ("--zero_shot_data", self.zero_shot_data),
                ("--num_fewshot", self.num_fewshot or None),
            )
            if value is not None
        ]
        require(
            self.eval_zero_shot or not given,
            f"{', '.join(given)} only apply to zero-shot evaluation; add --eval_zero_shot",
        )
        names = self.task_names
        require(bool(names), "--tasks is empty; name at least one task (e.g. --tasks arc_easy,hellaswag)")
        require(len(set(names)) == len(names), f"--tasks names a task twice: {','.join(names)}")
        require(self.num_fewshot >= 0, f"--num_fewshot must be 0 or more, got {self.num_fewshot}")
        require(
            self.limit is None or self.limit >= 1, f"--limit must be at least 1 (documents per task), got {self.limit}"
        )
        batch = str(self.eval_batch_size).strip().lower()
        require(
            batch == "auto" or (batch.isdigit() and int(batch) >= 1),
            f"--eval_batch_size must be a positive integer or 'auto', got {self.eval_batch_size!r}",
        )
        if self.eval_zero_shot and self.data_dir is not None:
            require(
                self.data_dir.is_dir(),
                f"--zero_shot_data {self.data_dir} is not a folder (expected the layout of shared/data/zeroshot: "
                "boolq/val.jsonl, arc_easy/ARC-Easy-Test.jsonl, ...); pass --zero_shot_data hub to download the "
                "tasks instead",
            )
            for name in names:
                if name in local_task_names():
                    local_task_files(name, self.data_dir)  # raises if a file is missing

    @property
    def task_names(self) -> tuple[str, ...]:
        if self.tasks is None:
            return PAPER_TASKS
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    @property
    def batch_size(self) -> int | str:
        batch = str(self.eval_batch_size).strip().lower()
        return "auto" if batch == "auto" else int(batch)

    @property
    def data_dir(self) -> Path | None:
        return resolve_data_dir(self.zero_shot_data)


@dataclass
class ZeroShotResult:
    """``metrics[task][metric]`` (acc, acc_norm, ...), ``stderr[task][metric]``, ``samples[task]`` = (evaluated,
    documents in the split), ``sources[task]`` = the local file(s) or ``hub``."""

    settings: dict
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stderr: dict[str, dict[str, float | None]] = field(default_factory=dict)
    samples: dict[str, tuple[int, int]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    zero_fraction_before: float = 0.0
    zero_fraction_after: float = 0.0
    seconds: float = 0.0
    lm_eval_version: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["samples"] = {t: {"evaluated": n, "total": total} for t, (n, total) in self.samples.items()}
        return out


# ----------------------------------------------------------------------------------------- evaluation
def linear_zero_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(zeros, size) of every matrix of the decoder blocks (``models.model_zero_counts``, the count behind every
    sparsity figure), so that a change of the weights by the harness is seen."""
    return model_zero_counts(model)


def _zero_fraction(counts: dict[str, tuple[int, int]]) -> float:
    total = sum(size for _, size in counts.values())
    return sum(zeros for zeros, _ in counts.values()) / total if total else 0.0


def _task_specs(settings: ZeroShotSettings) -> tuple[list, dict[str, str]]:
    specs, sources = [], {}
    local = set(local_task_names()) if settings.data_dir is not None else set()
    for name in settings.task_names:
        if name in local:
            config = local_task_config(name, settings.data_dir, settings.num_fewshot)
            specs.append(config)
            sources[name] = ", ".join(config["dataset_kwargs"]["data_files"].values())
        else:
            if settings.data_dir is not None:
                log.info(
                    "%s has no local definition (local: %s); taking it from the hub", name, ", ".join(sorted(local))
                )
            problem = hub_problem()
            if problem is not None:
                raise WandaError(
                    f"task {name} needs the hub, which cannot be reached ({problem}); point "
                    "--zero_shot_data at local copies of the task files"
                )
            specs.append(name)
            sources[name] = "hub"
    return specs, sources


def _split_metrics(task_results: dict) -> tuple[dict[str, float], dict[str, float | None]]:
    """The harness's ``{"acc,none": v, "acc_stderr,none": s, "alias": ...}`` -> ({acc: v}, {acc: s})."""
    values, errors = {}, {}
    for key, value in task_results.items():
        metric, _, _filter = key.partition(",")
        if not _ or metric == "alias":
            continue
        if metric.endswith("_stderr"):
            errors[metric[: -len("_stderr")]] = value if isinstance(value, (int, float)) else None
        elif isinstance(value, (int, float)):
            values[metric] = float(value)
    return values, {m: errors.get(m) for m in values}


def _run_harness(model: nn.Module, tokenizer, settings: ZeroShotSettings, specs: list, sources: dict) -> dict:
    """``lm_eval.simple_evaluate`` on the model as it is, in eval mode; the harness's errors as one line."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # The harness sets a pad token on the tokenizer it is given; keep the caller's (it may be saved later).
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=settings.batch_size)
    # Indexing the harness's thousands of built-in configs takes a while; only do it when a task needs it.
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                task_manager=manager,
                log_samples=False,
            )
    except KeyError as exc:
        raise WandaError(f"lm-eval does not know a task of --tasks {','.join(settings.task_names)}: {exc}") from exc
    except (ValueError, FileNotFoundError, ConnectionError) as exc:  # datasets' offline/missing-data errors
        hint = (
            " (offline, point --zero_shot_data at local copies of the task files)" if "hub" in sources.values() else ""
        )
        raise WandaError(
            f"lm-eval could not run {','.join(settings.task_names)}: {type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:300]}{hint}"
        ) from exc
    finally:
        model.train(was_training)


def evaluate_zero_shot(model: nn.Module, tokenizer, settings: ZeroShotSettings) -> ZeroShotResult:
    """Run the harness on ``model`` (in memory, where it is) and ``tokenizer``; raise if any zero moved."""
    try:
        import lm_eval
    except ImportError as exc:
        raise WandaError("zero-shot evaluation needs lm-eval: pip install 'wanda[zeroshot]'") from exc
    if settings.batch_size == "auto" and next(model.parameters()).device.type == "cpu":
        # the harness probes batch sizes at the model's full context (8k tokens x 64 for SmolLM2): on CPU that
        # exhausts memory instead of raising an out-of-memory error it could catch
        raise WandaError("--eval_batch_size auto needs a GPU; on CPU give a number (e.g. 8)")
    start = time.perf_counter()
    before = linear_zero_counts(model)
    specs, sources = _task_specs(settings)
    output = _run_harness(model, tokenizer, settings, specs, sources)
    after = linear_zero_counts(model)
    moved = [name for name in before if before[name] != after.get(name)]
    if moved:
        raise WandaError(
            f"zero-shot evaluation changed the zeros of {len(moved)} layers (first: {moved[0]}: "
            f"{before[moved[0]][0]} -> {after[moved[0]][0]} zeros); this is a bug, please report it"
        )

    result = ZeroShotResult(
        settings={**settings.to_dict(), "data_dir": str(settings.data_dir or "hub")},
        sources=sources,
        zero_fraction_before=_zero_fraction(before),
        zero_fraction_after=_zero_fraction(after),
        lm_eval_version=lm_eval.__version__,
    )
    for task, task_results in output["results"].items():
        values, errors = _split_metrics(task_results)
        if not values:
            continue
        result.metrics[task], result.stderr[task] = values, errors
        counts = output.get("n-samples", {}).get(task)
        if counts:
            result.samples[task] = (int(counts["effective"]), int(counts["original"]))
    result.seconds = time.perf_counter() - start
    return result


def format_table(result: ZeroShotResult) -> str:
    """Markdown table: task, metric, value, stderr, documents evaluated (of the split's total)."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---|---|---|"]
    for task, values in result.metrics.items():
        n, total = result.samples.get(task, (None, None))
        docs = "-" if n is None else (f"{n}" if n == total else f"{n} of {total}")
        for metric, value in values.items():
            err = result.stderr[task].get(metric)
            lines.append(f"| {task} | {metric} | {value:.4f} | {'-' if err is None else f'{err:.4f}'} | {docs} |")
    if result.metrics:
        means = [values["acc"] for values in result.metrics.values() if "acc" in values]
        if means:
            lines.append(f"| mean of {len(means)} | acc | {sum(means) / len(means):.4f} | - | - |")
    return "\n".join(lines)


def run_zero_shot(
    model: nn.Module,
    tokenizer,
    settings: ZeroShotSettings,
    save: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> dict:
    """The jobs' zero-shot step: evaluate, print the table, and write ``zero_shot.json`` into ``save`` when set.
    Returns the result as a JSON-ready dict."""
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task chatter; -v shows it
    log.info(
        "zero-shot: %s (%d-shot%s) from %s",
        ", ".join(settings.task_names),
        settings.num_fewshot,
        f", first {settings.limit} documents per task" if settings.limit else "",
        settings.data_dir or "the hub",
    )
    result = evaluate_zero_shot(model, tokenizer, settings)
    print(
        f"\nzero-shot ({settings.num_fewshot}-shot, lm-eval {result.lm_eval_version}, {result.seconds:.0f}s; "
        f"linear-layer zeros {result.zero_fraction_after:.4f}, unchanged):"
    )
    print(format_table(result), flush=True)
    payload = result.to_dict()
    if save:
        atomic_write_json(Path(save) / ZERO_SHOT_FILE, payload, overwrite)
    return payload
