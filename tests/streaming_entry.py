"""``wanda`` itself, with one test hook: ``WANDA_TEST_STALL=save_hidden:K`` (or ``save_block:K``) makes the
run hang right after the work folder received that file for block K, so that a test can SIGKILL the process at a
known point of a streamed run. Without the variable this is exactly ``wanda [flags]``."""

from __future__ import annotations

import os
import sys
import time

from wanda.cli.main import main
from wanda.engine.resume import WorkFolder


def _stall_after(method: str, index: int) -> None:
    saving = getattr(WorkFolder, method)

    def stalling(self, i, *rest):
        saving(self, i, *rest)
        if i == index:
            print(f"stalled in {method}({i})", file=sys.stderr, flush=True)
            time.sleep(3600)

    setattr(WorkFolder, method, stalling)


if __name__ == "__main__":
    if os.environ.get("WANDA_TEST_STALL"):
        method, index = os.environ["WANDA_TEST_STALL"].split(":")
        _stall_after(method, int(index))
    main(sys.argv[1:], prog="wanda")
