"""Entry points: ``wanda``, ``wanda-opt`` and ``python -m wanda.main``.

``wanda [flags]`` runs the original code's pruning job; ``wanda COMMAND ...`` another job. Every command is a row of
``COMMANDS``: the settings dataclasses its parser is generated from, and the job that receives them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, NoReturn, Union

from ..errors import WandaError
from ..parallel.launch import launched
from ..parallel.ranks import SINGLE, init_ranks
from .parsing import SettingsParser, guarded, setup_logging

__all__ = ["COMMANDS", "Command", "main", "main_opt", "run"]


@dataclass(frozen=True)
class Command:
    """A job of ``wanda``: ``module.<settings>`` (a tuple of settings classes) handed to ``module.<job>``."""

    module: str
    settings: str
    job: str
    description: str
    #: True for the job that runs over several processes under torchrun / accelerate launch (its settings
    #: include ``wanda.parallel.ranks.DistributedSettings``); the others refuse a launcher.
    distributed: bool = False

    def parser(self, prog: str) -> SettingsParser:
        module = importlib.import_module(f"wanda.jobs.{self.module}")
        return SettingsParser(
            getattr(module, self.settings),
            prog=prog,
            description=self.description,
            epilog=getattr(module, "EPILOG", None),
        )

    def run(self, argv: list[str], prog: str) -> int:
        try:
            if launched() and not self.distributed:
                raise WandaError("this command runs in one process; start it without torchrun / accelerate launch")
            # under a launcher, join the other ranks before reading the flags: a bad flag on one rank ends all
            ranks = init_ranks() if self.distributed else SINGLE
            try:
                with ranks.agreed("reading the flags"):
                    settings = self.parser(prog).parse_settings(argv)
                setup_logging(settings[-1].verbose)  # every job's last settings group is LogSettings
                if not ranks.is_main:  # one writer: the other ranks log warnings and errors only
                    logging.getLogger().setLevel(logging.WARNING)
                job: Callable[..., int] = getattr(importlib.import_module(f"wanda.jobs.{self.module}"), self.job)
                return job(*settings)
            finally:
                ranks.close()
        except WandaError as exc:
            exc.prog = getattr(exc, "prog", prog)  # reported by the command that failed, e.g. "wanda eval: error"
            raise


_EVAL = Command(
    "evaluate",
    "EVAL_JOB",
    "run_eval_job",
    "Evaluate a saved (pruned or dense) model, optionally with "
    "an unmerged LoRA --adapter: perplexity and/or zero-shot accuracy with lm-eval. Nothing is changed.",
)

#: ``wanda``'s commands; the empty name is the pruning job, a nested table a command with sub-commands.
COMMANDS: dict[str, Union[Command, dict[str, Command]]] = {
    "": Command(
        "prune",
        "PRUNE_JOB",
        "run_prune_job",
        "Prune a causal language model with a registered method "
        "(magnitude, Wanda, SparseGPT, the OBS ablations, ...), then report its perplexity. With no --model, "
        "prunes the bundled SmolLM2-135M offline. Under torchrun / accelerate launch, one job over all "
        "ranks (see the README).",
        distributed=True,
    ),
    "eval": _EVAL,
    "finetune": {
        "lora": Command(
            "finetune",
            "LORA_JOB",
            "run_lora",
            "Train a LoRA adapter on the frozen pruned weights; every pruned weight stays exactly zero (checked).",
        ),
        "full": Command(
            "finetune",
            "FULL_JOB",
            "run_full",
            "Train every weight with masked gradients; pruned weights stay exactly zero (checked).",
        ),
        "merge": Command(
            "finetune", "MERGE_JOB", "run_merge", "Merge a saved adapter into the pruned model, keeping every zero."
        ),
        "eval": _EVAL,
    },
    "vision": Command(
        "vision",
        "VISION_JOB",
        "run_vision_job",
        "Prune the linear and 1x1 convolution layers of an "
        "image classifier's blocks (never its head) with magnitude or Wanda, then report top-1/top-5 "
        "accuracy on DATA_PATH/val.",
    ),
    "generate": Command(
        "generate",
        "GENERATE_JOB",
        "run_generate_job",
        "Continue a --prompt greedily with a saved model and print the text, prefill and decode tokens/s "
        "(with --sparse_kernel: the pruned linears on the sparse CPU kernel).",
    ),
    "speedup": Command(
        "speedup",
        "SPEEDUP_JOB",
        "run_speedup_job",
        "Measure the inference speed-up of a 2:4-pruned "
        "model (prune it with --sparsity_type 2:4 --save_model DIR first): convert its linear layers "
        "to semi-structured sparse tensors, check the outputs against the dense model, and time both.",
    ),
}


def _listing(prog: str, table: dict[str, Command]) -> str:
    lines = [f"usage: {prog} {{{','.join(table)}}} ...", "", "commands:"]
    lines += [f"  {name:<8} {command.description}" for name, command in table.items()]
    return "\n".join(lines) + "\n"


def run(argv: list[str], prog: str = "wanda") -> int:
    """Run the command ``argv`` names; returns its exit code (usage errors exit through argparse)."""
    table: dict = COMMANDS
    while argv and isinstance(table.get(argv[0]), dict):
        name = argv.pop(0)
        table, prog = table[name], f"{prog} {name}"
    if table is COMMANDS:
        if argv and argv[0] in COMMANDS and argv[0]:
            name = argv.pop(0)
            return COMMANDS[name].run(argv, f"{prog} {name}")
        return COMMANDS[""].run(argv, prog)
    if argv and argv[0] in table:
        name = argv.pop(0)
        return table[name].run(argv, f"{prog} {name}")
    if argv[:1] in (["-h"], ["--help"]):
        print(_listing(prog, table), end="")
        return 0
    what = f"unknown command {argv[0]!r}" if argv else "a command is needed"
    print(f"{prog}: error: {what}; choose one of {', '.join(table)} (see {prog} --help)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, prog: str | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    if prog in ("main.py", "__main__.py", "-c", ""):
        prog = "wanda"
    guarded(lambda: run(argv, prog), prog)


def main_opt() -> NoReturn:
    """``wanda-opt``: the same tool (the architecture is detected), kept for the original code's OPT commands."""
    main(prog="wanda-opt")
