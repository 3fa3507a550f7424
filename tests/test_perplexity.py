"""Perplexity as the model defines it: the chunked evaluation equals exp(model(ids, labels=ids).loss)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, LOGIT_ARCHS, VOCAB, tiny_model

from wanda.eval import perplexity


@pytest.mark.parametrize("name", ARCHS + LOGIT_ARCHS)
def test_perplexity_equals_the_models_own_loss(name: str) -> None:
    model = tiny_model(name)
    windows = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # every window has the same number of targets
    # chunks of 7 positions over batches of 2: chunk and batch boundaries fall inside windows
    got = perplexity(model, windows, batch_size=2, chunk_tokens=14, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", LOGIT_ARCHS)
def test_the_models_logit_transform_changes_perplexity(name: str) -> None:
    """The post-processing is not a no-op on these tiny models, so the test above can fail without it."""
    model = tiny_model(name)
    windows = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.base_model(input_ids=windows).last_hidden_state
        raw = model.get_output_embeddings()(hidden[:, :-1]).float()
        plain = torch.nn.functional.cross_entropy(raw.reshape(-1, raw.shape[-1]), windows[:, 1:].reshape(-1))
    got = perplexity(model, windows, batch_size=2, progress=False)
    assert not math.isclose(got, math.exp(plain.item()), rel_tol=1e-3)


def test_a_broken_model_is_not_a_number() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    windows = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    assert math.isnan(perplexity(model, windows, progress=False))
