"""Shared pieces of the SmolLM2 benchmarks: the default protocol's data and the floor measurement."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from wanda.data import calibration_windows, evaluation_windows, resolve_source
from wanda.data.sources import TextSource, wikitext_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIKITEXT_TEST = Path(
    os.environ.get("WANDA_WIKITEXT_TEST", ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
)

#: The default protocol: fp32 on CPU, 1024-token windows, 32 calibration windows from the
#: wiki-summaries calibration part with seed 0, 40 evaluation windows per set.
PROTOCOL = {"seqlen": 1024, "nsamples": 32, "seed": 0, "eval_windows": 40, "batch_size": 2, "dtype": "float32"}


def protocol_data(tokenizer, protocol: dict = PROTOCOL) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Calibration windows and the evaluation sets (WikiText-2 test when present, held-out summaries)."""
    calib = calibration_windows(
        resolve_source("wiki-summaries", "calibration"),
        tokenizer,
        protocol["nsamples"],
        protocol["seqlen"],
        protocol["seed"],
    )
    evals = {}
    if WIKITEXT_TEST.is_file():
        source = TextSource("wikitext2", wikitext_rows(WIKITEXT_TEST.read_text("utf-8")))
        evals["wikitext2"] = evaluation_windows(source, tokenizer, protocol["seqlen"], protocol["eval_windows"])
    evals["wiki-summaries"] = evaluation_windows(
        resolve_source("wiki-summaries", "evaluation"), tokenizer, protocol["seqlen"], protocol["eval_windows"]
    )
    return calib, evals


@torch.no_grad()
def two_forward_floor(model, calib: torch.Tensor, batch_size: int) -> float:
    """Seconds for two plain forward passes of the decoder over the calibration tokens: the floor of a
    layer-wise method, which must run every block once to collect statistics and once more pruned."""
    body = model.base_model
    start = time.perf_counter()
    for _ in range(2):
        for batch in calib.split(batch_size):
            body(input_ids=batch, use_cache=False)
    return time.perf_counter() - start
