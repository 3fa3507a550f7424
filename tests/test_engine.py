"""The layer-wise engine, input recording and whole-model pruning on tiny random decoders of four architectures."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from conftest import assert_close, calib_ids, one_thread, tiny_model
from torch import nn

from wanda import PruneSettings, WandaError, model_sparsity, prune
from wanda.engine import LayerwiseEngine, capture_block_inputs
from wanda.methods import PRUNERS
from wanda.models import find_decoder_layout, find_linears
from wanda.stats import InputRecorder, SquaredNorm

#: Where each architecture keeps its blocks and the norm applied after the last one.
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "opt": "model.decoder.layers"}
FINAL_NORM = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "opt": "model.decoder.final_layer_norm",
}


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@functools.lru_cache(maxsize=None)
def _original(arch: str, layers: int = 2) -> nn.Module:
    return tiny_model(arch, num_hidden_layers=layers)


def _fresh(arch: str, layers: int = 2) -> nn.Module:
    return copy.deepcopy(_original(arch, layers))


def _hooks(model: nn.Module) -> set[tuple[str, str, int]]:
    """Every forward hook on the model. transformers installs hooks of its own (to record hidden states),
    so tests compare this set before and after rather than expecting it to be empty."""
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
        for key in hooks
    }


def _record_inputs(model: nn.Module, layers: dict[str, nn.Linear], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our own plain hooks: every input of every layer during one full forward pass, (tokens, features)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in seen.items()}


def _wanda_reference(weight: torch.Tensor, inputs: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """|W_ij| * sqrt(sum_t x_tj^2) in float64, the lowest floor(ratio * cols) of each row (stable order)."""
    scores = (weight.double().abs() * inputs.double().square().sum(0).sqrt()).numpy()
    mask = np.zeros(scores.shape, dtype=bool)
    k = int(ratio * scores.shape[1])
    for r, row in enumerate(scores):
        mask[r, np.argsort(row, kind="stable")[:k]] = True
    return torch.from_numpy(mask)


# (a) Wanda inside a full prune() equals an independent computation ---------------------------------------


def test_wanda_in_prune_equals_independent_computation_one_block():
    original = _fresh("llama", layers=1)
    model = copy.deepcopy(original)
    ids = calib_ids(8, 32)
    block = find_decoder_layout(original).blocks[0]
    inputs = _record_inputs(original, find_linears(block), ids)

    # batch_size 3 does not divide 8: batching must not change the statistics
    prune(model, ids, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False, batch_size=3)

    pruned_block = find_decoder_layout(model).blocks[0]
    for name, layer in find_linears(pruned_block).items():
        original_weight = find_linears(block)[name].weight.detach()
        expected = _wanda_reference(original_weight, inputs[name])
        assert torch.equal(layer.weight == 0, expected), name
        assert torch.equal(layer.weight[~expected], original_weight[~expected]), name


def test_second_block_is_calibrated_on_the_pruned_first_block():
    """Sequential pruning: block 1's statistics come from inputs that went through the *pruned* block 0."""
    original = _fresh("llama", layers=2)
    model = copy.deepcopy(original)
    ids = calib_ids(8, 32)
    prune(model, ids, PruneSettings(prune_method="wanda"), progress=False, batch_size=4)

    reference = copy.deepcopy(original)
    find_decoder_layout(reference).blocks[0].load_state_dict(find_decoder_layout(model).blocks[0].state_dict())
    block1 = find_decoder_layout(reference).blocks[1]
    inputs = _record_inputs(reference, find_linears(block1), ids)
    pruned1 = find_linears(find_decoder_layout(model).blocks[1])
    for name, layer in find_linears(block1).items():
        assert torch.equal(pruned1[name].weight == 0, _wanda_reference(layer.weight.detach(), inputs[name])), name


# (b) walking the blocks reproduces the full forward pass ----------------------------------------------------


def test_walk_reproduces_the_full_forward_pass(arch):
    model = _fresh(arch)
    ids = calib_ids(7, 16)  # batch_size 3 does not divide 7
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    outputs = {}
    hooks_before = _hooks(model)
    engine = LayerwiseEngine(model, batch_size=3, progress=False)
    assert engine.layout.path == BLOCKS[arch]
    model.train()  # walk runs in eval mode and restores the mode afterwards
    engine.walk(ids, after=lambda index, inputs: outputs.__setitem__(index, torch.cat(inputs.hidden)))
    assert model.training
    assert sorted(outputs) == [0, 1]
    assert_close(outputs[0], expected[1])
    # transformers' last hidden state already has the final norm applied
    final_norm = model.get_submodule(FINAL_NORM[arch])
    with torch.no_grad():
        assert_close(final_norm(outputs[1]), expected[2])
    assert _hooks(model) == hooks_before


def test_capture_removes_its_hook_when_the_forward_fails():
    model = _fresh("llama")
    block = find_decoder_layout(model).blocks[0]
    bad_ids = torch.full((2, 8), 10_000)  # beyond the vocabulary: the embedding raises
    before = _hooks(model)
    with pytest.raises(IndexError):
        capture_block_inputs(model, block, bad_ids, batch_size=2, device=torch.device("cpu"))
    assert _hooks(model) == before


def test_capture_stops_before_the_blocks():
    model = _fresh("llama")
    blocks = find_decoder_layout(model).blocks
    calls = []
    handle = blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        captured = capture_block_inputs(model, blocks[0], calib_ids(5, 8), batch_size=2, device=torch.device("cpu"))
    finally:
        handle.remove()
    assert calls == []  # block 0 itself never ran
    assert [h.shape[0] for h in captured.hidden] == [2, 2, 1]
    assert all(h.shape[1:] == (8, 64) for h in captured.hidden)


# (c) the input recorder: shared accumulators, hooks always removed ----------------------------------------


def _short(names) -> frozenset[str]:
    return frozenset(n.rsplit(".", 1)[-1] for n in names)


def test_recorder_shares_accumulators_for_the_same_input(arch):
    model = _fresh(arch)
    layout = find_decoder_layout(model)
    linears = find_linears(layout.blocks[0], layout.block_name(0))
    ids = calib_ids(4, 8)
    before = _hooks(model)
    with InputRecorder(linears, SquaredNorm) as recorder:
        for batch in ids.split(2):
            with torch.no_grad():
                model(input_ids=batch)
            recorder.end_batch()
    groups = {_short(members) for members in recorder.groups.values()}
    if arch == "opt":
        expected = {_short(["q_proj", "k_proj", "v_proj"]), _short(["out_proj"]), _short(["fc1"]), _short(["fc2"])}
    else:
        expected = {
            _short(["q_proj", "k_proj", "v_proj"]),
            _short(["o_proj"]),
            _short(["gate_proj", "up_proj"]),
            _short(["down_proj"]),
        }
    assert groups == expected
    assert len(recorder.stats) == 4  # one accumulator per distinct input
    for owner, members in recorder.groups.items():
        assert all(recorder.stat(m) is recorder.stats[owner] for m in members)
    assert _hooks(model) == before

    # the shared accumulator holds what each member saw, over both batches
    plain = _record_inputs(model, linears, ids)
    for name in linears:
        stat = recorder.stat(name)
        assert stat.tokens == plain[name].shape[0] == ids.numel()
        assert_close(stat.squared_norm(), plain[name].square().sum(0))


def test_recorder_removes_hooks_when_the_body_raises():
    model = _fresh("llama")
    linears = find_linears(find_decoder_layout(model).blocks[0])
    before = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with InputRecorder(linears, SquaredNorm):
            with torch.no_grad():
                model(input_ids=calib_ids(2, 8))
            raise RuntimeError("boom")
    assert _hooks(model) == before


def test_recorder_removes_hooks_when_the_forward_raises():
    model = _fresh("llama")
    linears = find_linears(find_decoder_layout(model).blocks[0])

    def failing_factory(features: int, device: torch.device):
        raise RuntimeError("statistic failed")

    before = _hooks(model)
    with pytest.raises(RuntimeError, match="statistic failed"):
        with InputRecorder(linears, failing_factory) as recorder:
            with torch.no_grad():
                model(input_ids=calib_ids(2, 8))
    assert _hooks(model) == before
    assert recorder._batch_inputs == []  # no reference to a batch outlives the recorder


# (d) prune() on every architecture -----------------------------------------------------------------------


def _check_untouched(original: nn.Module, pruned: nn.Module) -> set[str]:
    """Everything except the weights of the blocks' linear layers is bit-identical; returns those weights' names."""
    layout = find_decoder_layout(pruned)
    pruned_names = {
        f"{name}.weight" for i, block in enumerate(layout.blocks) for name in find_linears(block, layout.block_name(i))
    }
    before, after = original.state_dict(), pruned.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if key not in pruned_names:
            assert torch.equal(before[key], after[key]), f"{key} changed"
    # embeddings and head explicitly
    assert torch.equal(original.get_input_embeddings().weight, pruned.get_input_embeddings().weight)
    assert torch.equal(original.get_output_embeddings().weight, pruned.get_output_embeddings().weight)
    return pruned_names


def test_prune_wanda_unstructured_exact_per_row(arch):
    original = _fresh(arch)
    model = copy.deepcopy(original)
    before = _hooks(model)
    report = prune(model, calib_ids(4, 16), PruneSettings(prune_method="wanda"), progress=False)
    names = _check_untouched(original, model)
    weights = dict(model.named_parameters())
    assert len(names) == len(report.layers) == 2 * (6 if arch == "opt" else 7)
    for name in names:
        zeros = weights[name] == 0
        assert zeros.sum(1).tolist() == [zeros.shape[1] // 2] * zeros.shape[0], name
    assert set(model_sparsity(model).values()) == {0.5}
    assert report.actual_sparsity == 0.5
    assert _hooks(model) == before


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", PRUNERS)
def test_prune_nm_valid_for_every_method(arch, method, pattern):
    original = _fresh(arch, layers=1)  # one block keeps the 56 cases fast; the matrices are the same
    model = copy.deepcopy(original)
    n, m = map(int, pattern.split(":"))
    ids = None if method == "magnitude" else calib_ids(4, 16)
    before = _hooks(model)
    report = prune(model, ids, PruneSettings(prune_method=method, sparsity_type=pattern), progress=False)
    names = _check_untouched(original, model)
    weights = dict(model.named_parameters())
    for name in names:
        zeros = (weights[name] == 0).reshape(weights[name].shape[0], -1, m)
        assert zeros.sum(-1).ge(n).all(), f"{name} breaks {pattern}"
        assert torch.isfinite(weights[name]).all()
    assert report.actual_sparsity == pytest.approx(n / m, abs=1e-6)
    assert _hooks(model) == before


def test_prune_needs_calibration_for_activation_methods():
    with pytest.raises(WandaError, match="needs calibration samples"):
        prune(_fresh("llama"), None, PruneSettings(prune_method="wanda"), progress=False)


# (e) models without decoder blocks -------------------------------------------------------------------------


def test_find_decoder_layout_rejects_a_model_without_blocks():
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(WandaError, match="Sequential is not supported: found no decoder blocks"):
        find_decoder_layout(plain)
    with pytest.raises(WandaError, match="no decoder blocks"):
        prune(plain, None, PruneSettings(prune_method="magnitude"), progress=False)


def test_find_decoder_layout_on_the_tiny_models(arch):
    model = _original(arch)
    layout = find_decoder_layout(model)
    assert layout.path == BLOCKS[arch]
    assert len(layout.blocks) == 2
    assert len(find_decoder_layout(_original(arch, 1)).blocks) == 1
    assert layout.blocks is model.get_submodule(BLOCKS[arch])
