"""One rank of the 2-process tests in ``test_distributed.py``, started with the variables torchrun sets.

``python distributed_worker.py OUT MODE``. MODE ``prune``: tiny LLaMA and OPT, each pruned with Wanda, magnitude,
SparseGPT, ADMM-Grad and ALPS through ``prune(..., ranks=...)``, plus dense and pruned perplexity through ``ranks.perplexity``; the
main rank saves the pruned weights and perplexities to OUT. MODE ``die``: rank 1 exits abruptly at its first
statistics reduction, to see how rank 0 ends. MODE ``moe``: the tiny mixtures of experts of ``test_moe``, each rank
with one short window, so that some expert is routed tokens on one rank only; every rank saves its weights and
the statistics it held before each reduction to OUT.rank-R.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import calib_ids, tiny_model  # noqa: E402

from wanda import PruneSettings, prune  # noqa: E402
from wanda.errors import WandaError  # noqa: E402
from wanda.models import find_decoder_layout, find_linears  # noqa: E402
from wanda.parallel.ranks import DistributedSettings, Ranks, init_ranks  # noqa: E402
from wanda.pruning.handle import ResidentModel  # noqa: E402

ARCHS = ("llama", "opt")
METHODS = ("wanda", "magnitude", "sparsegpt", "owl_wanda_dsnot", "admm", "alps")
#: what each key of METHODS prunes with (a plain method name otherwise)
SETTINGS = {"owl_wanda_dsnot": dict(prune_method="wanda", sparsity_profile="owl", dsnot=True)}


def settings_of(method: str) -> PruneSettings:
    return PruneSettings(**SETTINGS.get(method, dict(prune_method=method)))


#: 8 windows in batches of 2: 4 batches, 2 per rank; 6 evaluation windows: 3 batches, split 1 / 2
CALIB, EVAL, BATCH = dict(n=8, seqlen=32, seed=0), dict(n=6, seqlen=32, seed=1), 2


def pruned_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    layout = find_decoder_layout(model)
    return {
        name: layer.weight.detach().clone()
        for i, block in enumerate(layout.blocks)
        for name, layer in find_linears(block, layout.block_name(i)).items()
    }


def run_prune(ranks: Ranks, out: Path) -> None:
    results = {}
    for arch in ARCHS:
        original = tiny_model(arch)
        dense = ResidentModel.of(original, ranks).perplexity({"eval": calib_ids(**EVAL)}, BATCH, "dense")["eval"]
        for method in METHODS:
            model = copy.deepcopy(original)
            report = prune(
                model, calib_ids(**CALIB), settings_of(method), batch_size=BATCH, progress=False, ranks=ranks
            )
            ppl = ResidentModel.of(model, ranks).perplexity({"eval": calib_ids(**EVAL)}, BATCH, "pruned")["eval"]
            results[(arch, method)] = {
                "weights": pruned_weights(model),
                "ppl": ppl,
                "dense_ppl": dense,
                "layers": [layer.name for layer in report.layers],
            }
    if ranks.is_main:
        torch.save(results, out)


def run_die(ranks: Ranks) -> None:
    if ranks.rank == 1:

        def die(self, stats, factory=None):  # a rank lost mid-job (killed, out of memory)
            os._exit(3)

        Ranks.reduce = die
    prune(
        tiny_model("llama"),
        calib_ids(**CALIB),
        PruneSettings(prune_method="wanda"),
        batch_size=BATCH,
        progress=False,
        ranks=ranks,
    )


#: MoE mode: one window of 3 tokens per rank (top-2 of 4 experts: 6 choices, so experts go unseen on a rank)
MOE_CALIB, MOE_BATCH = dict(n=2, seqlen=3, seed=0), 1
MOE_METHODS = ("wanda", "sparsegpt")


def run_moe(ranks: Ranks, out: Path) -> None:
    from test_moe import MOE_ARCHS, _original

    seen: list[list[str]] = []
    reduce = Ranks.reduce

    def recording(self, stats, factory=None):
        seen.append(sorted(stats))  # what this rank's tokens produced, before the ranks agree
        return reduce(self, stats, factory)

    Ranks.reduce = recording
    results = {}
    for arch in MOE_ARCHS:
        for method in MOE_METHODS:
            seen.clear()
            model = copy.deepcopy(_original(arch))
            report = prune(
                model,
                calib_ids(**MOE_CALIB),
                PruneSettings(prune_method=method),
                batch_size=MOE_BATCH,
                progress=False,
                ranks=ranks,
            )
            results[(arch, method)] = {
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "seen": list(seen),
                "tokens": {l.name: l.tokens for l in report.layers},
            }
    torch.save(results, out.with_name(f"{out.name}.rank-{ranks.rank}"))


def main() -> int:
    torch.set_num_threads(1)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    ranks = init_ranks(DistributedSettings(dist_timeout=60), device="cpu")
    try:
        {"prune": lambda: run_prune(ranks, out), "die": lambda: run_die(ranks), "moe": lambda: run_moe(ranks, out)}[
            mode
        ]()
    except WandaError as exc:
        print(f"wanda: error: {exc}", file=sys.stderr)
        return 2
    finally:
        ranks.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
