"""Pruning on a CUDA device gives what it gives on the CPU, with the model on the GPU or offloaded on the CPU.

The engine keeps only the block being pruned on the compute device; these tests check that path and the
all-on-GPU one against a CPU run of the same model. Skipped (with the reason shown by ``pytest -ra``) where
there is no CUDA device. Run with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, assert_close, tiny_model

from wanda import PruneSettings, prune
from wanda.models import find_decoder_layout, find_linears

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = ["magnitude", "wanda", "sparsegpt", "ablate_wanda_seq"]


def _weights(model) -> dict[str, torch.Tensor]:
    layout = find_decoder_layout(model)
    return {
        name: layer.weight.detach().float().cpu()
        for index, block in enumerate(layout.blocks)
        for name, layer in find_linears(block, layout.block_name(index)).items()
    }


def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))


def _pruned(method: str, pattern: str, placement: str) -> dict[str, torch.Tensor]:
    model = tiny_model("llama", seed=0).eval()
    if placement == "gpu":
        model = model.to("cuda")
    device = "cpu" if placement == "cpu" else "cuda"
    settings = PruneSettings(prune_method=method, sparsity_ratio=0.5, sparsity_type=pattern)
    prune(model, None if method == "magnitude" else _calibration(), settings, device=device, progress=False)
    if placement == "offload":
        assert all(p.device.type == "cpu" for p in model.parameters()), "an offloaded block stayed on the GPU"
    return _weights(model)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("placement", ["gpu", "offload"])
def test_cuda_pruning_matches_cpu(method, pattern, placement):
    reference, result = _pruned(method, pattern, "cpu"), _pruned(method, pattern, placement)
    assert reference.keys() == result.keys()
    for name, weight in result.items():
        mask = weight == 0
        rows, cols = mask.shape
        if pattern == "2:4":
            assert (mask.view(rows, cols // 4, 4).sum(-1) == 2).all(), name  # every group, exactly
        else:
            # Wanda compares within each output row; magnitude over the matrix, SparseGPT per block of columns
            assert mask.sum().item() == rows * cols // 2, name
            if method == "wanda":
                assert (mask.sum(1) == cols // 2).all(), name
        agreement = (mask == (reference[name] == 0)).float().mean().item()
        # float sums in another order can swap near-ties; anything more is a real difference
        assert agreement > 0.99, f"{name}: masks agree on {agreement:.4f} only"
        if agreement == 1.0:  # same mask: the (OBS-updated) kept weights must agree too
            assert_close(weight, reference[name], rtol=1e-3, msg=name)


def test_statistics_accumulate_in_float32_for_half_models():
    """A fp16 model on the GPU: the norms and Hessians are fp32, so the masks match a fp32 run's closely."""
    half = tiny_model("llama", seed=0).eval().to("cuda", torch.float16)
    full = tiny_model("llama", seed=0).eval().to("cuda")
    settings = PruneSettings(prune_method="wanda", sparsity_ratio=0.5)
    prune(half, _calibration(), settings, progress=False)
    prune(full, _calibration(), settings, progress=False)
    reference = _weights(full)
    for name, weight in _weights(half).items():
        agreement = ((weight == 0) == (reference[name] == 0)).float().mean().item()
        assert agreement > 0.97, f"{name}: {agreement:.4f}"


@pytest.mark.parametrize("kind", ["distinct", "ties"])
def test_masks_on_cuda_equal_the_cpu_ones(kind):
    """CUDA takes other paths (a sort instead of the selection network, and for long slices instead of
    kthvalue); the masks must be the same, ties included."""
    from wanda.masks import matrix_mask, nm_mask, row_mask

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(256, 1024, generator=generator)
    if kind == "ties":
        scores = torch.randint(0, 5, scores.shape, generator=generator).float()
    gpu = scores.cuda()
    for n, m in ((2, 4), (4, 8), (1, 4)):
        assert torch.equal(nm_mask(gpu, n, m).cpu(), nm_mask(scores, n, m)), f"{n}:{m}"
    assert torch.equal(row_mask(gpu, 0.5).cpu(), row_mask(scores, 0.5))
    assert torch.equal(matrix_mask(gpu, 0.3).cpu(), matrix_mask(scores, 0.3))  # one slice of 262144: sorted
