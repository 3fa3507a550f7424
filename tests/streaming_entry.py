"""A streamed prune + save driven from the command line, for the kill-and-resume tests (a stand-in until the
``wanda prune --offload disk`` flags exist). ``--stall_after K`` hangs once block K's outputs are saved, so the
test can kill the process at a known point; errors exit 2 through the CLI's own error boundary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import calib_ids  # noqa: E402

from wanda import PruneSettings  # noqa: E402
from wanda.cli.common import guarded, setup_logging  # noqa: E402
from wanda.engine.resume import WorkFolder  # noqa: E402
from wanda.engine.streaming import StreamSettings  # noqa: E402
from wanda.streaming import prune_streamed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("save_model")
    p.add_argument("--prune_method", default="wanda")
    p.add_argument("--sparsity_ratio", type=float, default=0.5)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--stall_after", type=int, default=None)
    p.add_argument("--stall_at", choices=("save_block", "save_hidden"), default="save_hidden")
    args = p.parse_args()
    setup_logging(False)
    if args.stall_after is not None:
        # save_hidden(k) stores the inputs of block k, i.e. block k-1 is then complete
        saving = getattr(WorkFolder, args.stall_at)
        done = args.stall_after + (1 if args.stall_at == "save_hidden" else 0)

        def stalling(self, index, *rest):
            saving(self, index, *rest)
            if index == done:
                print(f"stalled in {args.stall_at}({index})", file=sys.stderr, flush=True)
                time.sleep(3600)

        setattr(WorkFolder, args.stall_at, stalling)
    settings = PruneSettings(prune_method=args.prune_method, sparsity_ratio=args.sparsity_ratio)
    prune_streamed(args.model, calib_ids(8, 32), settings, StreamSettings(offload="disk", work_dir=args.work_dir),
                   save_model=args.save_model, batch_size=2, progress=False, seed=0)
    return 0


if __name__ == "__main__":
    guarded(main, "wanda")
