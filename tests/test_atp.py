"""The ATP sparsity profile (ratios rising linearly with depth): its block ratios by hand, the exact overall
count, per-layer ratios within one weight of their block's, determinism, every method, and the streamed engine
against one in-memory process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import calib_ids, one_thread, save_tiny, tiny_model

from wanda import PruneSettings, WandaError, prune
from wanda.masks import prune_count
from wanda.methods import PRUNERS
from wanda.models import find_decoder_layout, find_linears
from wanda.pruning.profiles import atp_ratios, exact_layer_ratios

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_atp_ratios_by_hand():
    assert atp_ratios(3, 0.7, 0.16) == pytest.approx([0.62, 0.7, 0.78], rel=1e-12)
    ratios = atp_ratios(30, 0.6, 0.16)
    assert sum(ratios) / 30 == pytest.approx(0.6, rel=1e-12)
    assert all(b > a for a, b in zip(ratios, ratios[1:]))
    assert ratios[-1] - ratios[0] == pytest.approx(0.16, rel=1e-12)
    assert atp_ratios(1, 0.5, 0.16) == [0.5]


@pytest.mark.parametrize("seed", range(5))
def test_exact_layer_ratios_sum_to_the_target_count(seed):
    """Blocks of one shape (a decoder's), layers of random sizes: every layer within one weight of its block's
    ratio, the model's count exact; blocks of unequal sizes: still exact."""
    g = torch.Generator().manual_seed(seed)
    blocks = int(torch.randint(1, 9, (1,), generator=g))
    shape = [int(torch.randint(1, 5000, (1,), generator=g)) for _ in range(3)]
    sizes = [{f"b{l}.m{j}": size for j, size in enumerate(shape)} for l in range(blocks)]
    target = 0.3 + 0.5 * float(torch.rand(1, generator=g))
    block_ratios = atp_ratios(blocks, target, 0.2)
    ratios = exact_layer_ratios(block_ratios, sizes, target)
    total = sum(size for block in sizes for size in block.values())
    pruned = sum(prune_count(ratios[name], size) for block in sizes for name, size in block.items())
    assert pruned == prune_count(target, total)
    for l, block in enumerate(sizes):
        for name, size in block.items():
            assert abs(ratios[name] - block_ratios[l]) <= 1 / size + 1e-9, name
    uneven = [{f"b{l}.m{j}": int(torch.randint(1, 5000, (1,), generator=g)) for j in range(3)} for l in range(blocks)]
    ratios = exact_layer_ratios(block_ratios, uneven, target)
    total = sum(size for block in uneven for size in block.values())
    assert sum(prune_count(ratios[n], size) for block in uneven for n, size in block.items()) == prune_count(
        target, total
    )
    assert all(0 <= r <= 1 for r in ratios.values())


def _zeros(model) -> dict[str, int]:
    layout = find_decoder_layout(model)
    return {
        name: int((layer.weight == 0).sum())
        for i, block in enumerate(layout.blocks)
        for name, layer in find_linears(block, layout.block_name(i)).items()
    }


def _config(method: str) -> dict:
    extra = {"blocksize": 32} if method.startswith("ablate") and "iter" in method else {}
    return dict(prune_method=method, sparsity_profile="atp", sparsity_ratio=0.6, atp_span=0.3, **extra)


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_every_method_prunes_the_exact_overall_count_at_atp_ratios(method):
    model = tiny_model("llama", num_hidden_layers=3)
    settings = PruneSettings(**_config(method))
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4)
    zeros = _zeros(model)
    layout = find_decoder_layout(model)
    sizes = {n: l.weight.numel() for n, l in find_linears(model).items()}
    total = sum(sizes[name] for name in zeros)
    assert sum(zeros.values()) == prune_count(0.6, total)
    blocks = atp_ratios(len(layout.blocks), 0.6, 0.3)
    for entry in report.layers:
        block = next(i for i in range(len(layout.blocks)) if entry.name.startswith(layout.block_name(i) + "."))
        assert abs(entry.ratio - blocks[block]) <= 1 / sizes[entry.name] + 1e-12, entry.name
        assert zeros[entry.name] == prune_count(entry.ratio, sizes[entry.name]), entry.name


def test_atp_is_deterministic():
    original = tiny_model("llama", num_hidden_layers=3)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(original)
        prune(model, calib_ids(), PruneSettings(**_config("alps")), progress=False, batch_size=4)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("method", ["wanda", "alps"])
def test_streamed_atp_equals_in_memory(tmp_path, method):
    from test_streaming import _in_memory, _state

    from wanda.engine.streaming import StreamSettings
    from wanda.pruning.streamed import prune_streamed

    folder = save_tiny(tmp_path, "llama")
    settings = PruneSettings(**_config(method))
    ids = calib_ids()
    _in_memory(folder, settings, tmp_path / "memory", ids)
    run = prune_streamed(
        folder,
        ids,
        settings,
        StreamSettings(offload="disk"),
        save_model=tmp_path / "streamed",
        batch_size=2,
        progress=False,
    )
    assert len({layer.ratio for layer in run.report.layers}) > 1
    memory, streamed = _state(tmp_path / "memory"), _state(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, streamed[name]), name


def test_atp_settings_are_validated():
    with pytest.raises(WandaError, match="--sparsity_profile atp"):
        PruneSettings(prune_method="alps", sparsity_profile="atp", sparsity_type="2:4")
    with pytest.raises(WandaError, match="--atp_span"):
        PruneSettings(prune_method="alps", sparsity_profile="atp", sparsity_ratio=0.9, atp_span=0.3)
    with pytest.raises(WandaError, match="--atp_span"):
        PruneSettings(prune_method="alps", sparsity_profile="atp", sparsity_ratio=0.5, atp_span=0.0)
    assert math.isclose(PruneSettings(sparsity_profile="atp").atp_span, 0.16)
