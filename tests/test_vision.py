"""Image-classifier pruning on tiny ConvNeXt / ViT / DeiT configurations and a tiny 1x1-convolution net.

Expectations are computed independently of the library: activations are captured with plain forward hooks
and Wanda's mask is rebuilt from them with argsort, the head is compared parameter by parameter.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close
from PIL import Image
from torch import nn

from wanda.errors import WandaError
from wanda.masks import check_nm
from wanda.vision import (
    ImageFolder,
    Preprocess,
    VisionPruneSettings,
    calibration_batches,
    find_layout,
    load_classifier,
    named_spec,
    prune_classifier,
    read_state_dict,
)
from wanda.vision.layout import matrix_view


def hf_forward(model, images):
    return model(pixel_values=images).logits


def plain_forward(model, images):
    return model(images)


def tiny_convnext(num_labels: int = 5, seed: int = 0):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    torch.manual_seed(seed)
    config = ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, image_size=32, num_labels=num_labels
    )
    return ConvNextForImageClassification(config).eval()


def tiny_vit(num_labels: int = 5, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config).eval()


def tiny_deit_distilled(num_labels: int = 5):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_labels=num_labels,
    )
    return DeiTForImageClassificationWithTeacher(config).eval()


class PointwiseBlock(nn.Module):
    """A ConvNeXt block with a channels-first MLP (timm's ``conv_mlp=True``): depthwise 3x3, two 1x1 convs."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1 = nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.dw(x))))


class PointwiseNet(nn.Module):
    """A timm-style model (``pretrained_cfg["classifier"]`` names the head) with pointwise convolutions."""

    pretrained_cfg = {"classifier": "head"}

    def __init__(self, dim: int = 8, classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(PointwiseBlock(dim), PointwiseBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batches(x: torch.Tensor, size: int = 4):
    return list(x.split(size))


CASES = {
    "convnext": (tiny_convnext, hf_forward, 32),
    "vit": (tiny_vit, hf_forward, 16),
    "pointwise": (PointwiseNet, plain_forward, 16),
}


def settings(metric: str = "wanda", granularity: str = "row", **kw) -> VisionPruneSettings:
    return VisionPruneSettings(prune_metric=metric, prune_granularity=granularity, **kw)


# --- which layers ---------------------------------------------------------------------------------------------


def test_convnext_layout_prunes_pointwise_linears_only():
    layout = find_layout(tiny_convnext())
    assert layout.blocks == ["convnext.encoder.stages"]
    assert list(layout.prunable) == [
        f"convnext.encoder.stages.{s}.layers.{i}.{fc}"
        for s, n in ((0, 2), (1, 1))
        for i in range(n)
        for fc in ("pwconv1", "pwconv2")
    ]
    assert list(layout.head) == ["classifier"]


def test_vit_layout_and_head():
    layout = find_layout(tiny_vit())
    names = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    assert sorted(layout.prunable) == sorted(f"vit.layers.{i}.{n}" for i in range(2) for n in names)
    assert list(layout.head) == ["classifier"]


def test_distilled_deit_keeps_both_heads():
    layout = find_layout(tiny_deit_distilled())
    assert set(layout.head) == {"cls_classifier", "distillation_classifier"}
    assert not any("classifier" in name for name in layout.prunable)
    assert len(layout.prunable) == 12


def test_head_is_found_by_structure_not_by_width():
    # a head as wide as the MLP's hidden layer, and an MLP as wide as the classes: neither changes the result
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=16,
            patch_size=4,
            num_labels=32,
        )
    )
    layout = find_layout(model)
    assert list(layout.head) == ["classifier"] and "classifier" not in layout.prunable


def test_pointwise_convs_and_timm_protocol():
    layout = find_layout(PointwiseNet())
    assert list(layout.prunable) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert list(layout.head) == ["head"]

    class GetClassifierNet(PointwiseNet):
        pretrained_cfg = {}

        def get_classifier(self):
            return self.head

    assert list(find_layout(GetClassifierNet()).head) == ["head"]


def test_model_without_a_known_head_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(WandaError, match="classifier head"):
        find_layout(model)


# --- exact sparsity, untouched head, hooks ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("metric", ["magnitude", "wanda"])
@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_exact_sparsity_and_untouched_rest(case, metric, granularity):
    build, forward, size = CASES[case]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratio = 0.6
    report = prune_classifier(
        model, batches(images(8, size)), settings(metric=metric, granularity=granularity, sparsity=ratio), forward
    )
    layout = find_layout(model)
    pruned_keys = {f"{name}.weight" for name in layout.prunable}
    for key, value in model.state_dict().items():
        if key not in pruned_keys:  # head, biases, norms, stem, depthwise and downsampling convs
            assert torch.equal(value, before[key]), key
    for name, layer in layout.prunable.items():
        zeros = matrix_view(layer) == 0
        assert not layer._forward_pre_hooks and not layer._forward_hooks
        if granularity == "row":
            assert (zeros.sum(dim=1) == math.floor(ratio * zeros.shape[1])).all(), name
        else:
            assert zeros.sum().item() == math.floor(ratio * zeros.numel()), name
    assert report.head == list(layout.head)
    assert len(report.layers) == len(layout.prunable)
    sizes = [(o, i) for o, i in (l.shape for l in report.layers)]
    per = [o * math.floor(ratio * i) if granularity == "row" else math.floor(ratio * o * i) for o, i in sizes]
    assert report.actual_sparsity == pytest.approx(sum(per) / sum(o * i for o, i in sizes))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("metric", ["magnitude", "wanda"])
def test_nm_holds_in_every_group(case, metric):
    build, forward, size = CASES[case]
    model = build()
    report = prune_classifier(model, batches(images(4, size)), settings(metric=metric, sparsity_type="2:4"), forward)
    for layer in find_layout(model).prunable.values():
        zeros = matrix_view(layer) == 0
        assert check_nm(zeros, 2, 4)
        assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) == 2).all()
    assert report.actual_sparsity == 0.5


def test_magnitude_needs_no_calibration_and_matches_hand_computed_mask():
    model = tiny_vit()
    weights = {n: matrix_view(l).clone() for n, l in find_layout(model).prunable.items()}
    prune_classifier(model, None, settings(metric="magnitude", granularity="layer", sparsity=0.5), hf_forward)
    for name, layer in find_layout(model).prunable.items():
        w = weights[name]
        threshold = w.abs().flatten().sort().values[w.numel() // 2 - 1]
        assert torch.equal(matrix_view(layer) == 0, w.abs() <= threshold)


# --- Wanda against an independent computation ------------------------------------------------------------------


def recorded_norms(model, layers: dict[str, nn.Module], forward, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 over every token / pixel, from inputs captured with plain forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(lambda m, inp, out, name=name: seen[name].append(inp[0].detach()))
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for batch in data:
            forward(model, batch)
    for handle in handles:
        handle.remove()
    norms = {}
    for name, inputs in seen.items():
        if isinstance(layers[name], nn.Conv2d):  # (B, C, H, W): channels are the features, pixels the tokens
            tokens = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in inputs])
        else:
            tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        norms[name] = tokens.double().pow(2).sum(0).sqrt()
    return norms


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_wanda_mask_matches_recorded_activations(case, granularity):
    build, forward, size = CASES[case]
    model = build()
    data = batches(images(6, size, seed=1), 3)
    layers = find_layout(model).prunable
    norms = recorded_norms(model, layers, forward, data)  # from the dense model: one pass, all layers at once
    weights = {name: matrix_view(layer).clone() for name, layer in layers.items()}
    ratio = 0.5
    prune_classifier(model, data, settings(metric="wanda", granularity=granularity, sparsity=ratio), forward)
    for name, layer in layers.items():
        score = weights[name].double().abs() * norms[name].unsqueeze(0)  # |W_ij| * ||X_j||
        if granularity == "row":
            k = int(ratio * score.shape[1])
            expected = torch.zeros_like(score, dtype=torch.bool)
            expected.scatter_(1, score.argsort(dim=1)[:, :k], True)
        else:
            k = int(ratio * score.numel())
            expected = torch.zeros(score.numel(), dtype=torch.bool)
            expected[score.flatten().argsort()[:k]] = True
            expected = expected.view_as(score)
        assert torch.equal(matrix_view(layer) == 0, expected), name


@pytest.mark.parametrize("granularity", ["row", "layer"])
def test_ria_from_the_method_registry_matches_its_formula(granularity):
    # the classifier pruner takes its scores from the language models' registry: RIA there is
    # (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||^0.5, computed here independently in float64
    build, forward, size = CASES["vit"]
    model = build()
    data = batches(images(6, size, seed=2), 3)
    layers = find_layout(model).prunable
    norms = recorded_norms(model, layers, forward, data)
    weights = {name: matrix_view(layer).clone() for name, layer in layers.items()}
    ratio = 0.5
    prune_classifier(model, data, settings(metric="ria", granularity=granularity, sparsity=ratio), forward)
    for name, layer in layers.items():
        w = weights[name].double().abs()
        score = (w / w.sum(0, keepdim=True) + w / w.sum(1, keepdim=True)) * norms[name].sqrt().unsqueeze(0)
        if granularity == "row":
            k = int(ratio * score.shape[1])
            expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(dim=1)[:, :k], True)
        else:
            k = int(ratio * score.numel())
            expected = torch.zeros(score.numel(), dtype=torch.bool)
            expected[score.flatten().argsort()[:k]] = True
            expected = expected.view_as(score)
        pruned = matrix_view(layer) == 0
        # float32 scores against float64 ones: ties at the threshold may swap, nothing else
        assert (pruned != expected).float().mean() < 0.002, name
        assert pruned.sum() == expected.sum(), name


def test_wanda_uses_the_activations():
    # the same weights pruned per row with and without the activation norms give different masks
    data = [images(4, 16)]
    a, b = tiny_vit(), tiny_vit()
    prune_classifier(a, data, settings(metric="wanda"), hf_forward)
    prune_classifier(b, data, settings(metric="magnitude", granularity="row"), hf_forward)
    masks_a = [matrix_view(l) == 0 for l in find_layout(a).prunable.values()]
    masks_b = [matrix_view(l) == 0 for l in find_layout(b).prunable.values()]
    assert any(not torch.equal(x, y) for x, y in zip(masks_a, masks_b))


# --- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prune_metric="sparsegpt"), "--prune_metric"),
        (dict(prune_granularity="column"), "--prune_granularity"),
        (dict(sparsity=1.0), "--sparsity"),
        (dict(sparsity=0.6, sparsity_type="2:4"), "prunes exactly 0.5"),
        (dict(nsamples=0), "--nsamples"),
    ],
)
def test_settings_are_validated(kw, match):
    with pytest.raises(WandaError, match=match):
        VisionPruneSettings(**kw)


def test_nm_implies_its_ratio():
    assert VisionPruneSettings(sparsity_type="4:8").sparsity == 0.5


# --- preprocessing and data --------------------------------------------------------------------------------------


def test_preprocess_matches_transformers_image_processors():
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    for processor in (
        ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875),
        ViTImageProcessorPil(size={"height": 24, "width": 24}),
    ):
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        mine = Preprocess.from_image_processor(processor.to_dict())
        assert_close(mine(image), expected)
        assert Preprocess.from_image_processor(mine.to_image_processor()) == mine


def test_preprocess_by_hand():
    pre = Preprocess(resize=10, crop=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = pre(Image.new("L", (40, 20), color=51))  # 51/255 = 0.2 everywhere, gray -> RGB
    assert out.shape == (3, 8, 8)
    assert_close(out, torch.full_like(out, (0.2 - 0.5) / 0.25))
    deit = Preprocess.from_image_processor(
        {"size": {"height": 256, "width": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}
    )
    assert deit.resize == (256, 256) and deit.crop == (224, 224)
    assert Preprocess.center_crop_pct(224, 0.875).resize == 256


def write_image_tree(root: Path, classes: int = 5, per_class: int = 4, size: tuple[int, int] = (20, 24)) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_image_folder_and_calibration_sampling(tmp_path):
    root = write_image_tree(tmp_path)
    pre = Preprocess(resize=16, crop=(16, 16))
    train = ImageFolder(root / "train", pre)
    assert train.classes == [f"class{c}" for c in range(5)] and len(train) == 20
    image, label = train[5]
    assert image.shape == (3, 16, 16) and label == 1
    drawn = list(calibration_batches(train, nsamples=7, batch_size=3, seed=0))
    assert [b.shape[0] for b in drawn] == [3, 3, 1]
    again = list(calibration_batches(train, nsamples=7, batch_size=3, seed=0))
    assert all(torch.equal(x, y) for x, y in zip(drawn, again))
    (root / "val" / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "extra" / "x.png")
    with pytest.raises(WandaError, match="train/ lacks"):
        ImageFolder(root / "val", pre, classes=train.classes)


# --- models and the command -----------------------------------------------------------------------------------


def test_named_specs():
    spec = named_spec("convnext_base")
    assert spec.hub_id == "facebook/convnext-base-224"
    assert spec.preprocess == Preprocess(256, (224, 224))
    assert named_spec("vit_large_patch16_224").hub_id == "google/vit-large-patch16-224"
    assert named_spec("deit_base_patch16_224").hub_id == "facebook/deit-base-patch16-224"
    assert named_spec("deit_small_distilled_patch16_224").hub_id == "facebook/deit-small-distilled-patch16-224"
    model = named_spec("vit_tiny_patch16_224").build(7)  # builds the real config (5.7M parameters)
    assert model.config.hidden_size == 192 and model.config.num_hidden_layers == 12 and model.config.num_labels == 7
    with pytest.raises(WandaError, match="unknown model"):
        named_spec("resnet50")


def test_read_state_dict_unwraps_the_seeds_format(tmp_path):
    state = {"module.a": torch.ones(2)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt.pth")
    assert list(read_state_dict(tmp_path / "ckpt.pth")) == ["a"]


def test_state_dict_with_transformers_keys_loads_by_name(tmp_path):
    model = named_spec("vit_tiny_patch16_224").build(3)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    loaded = load_classifier("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), "transformers", num_classes=3)
    assert loaded.library == "transformers" and loaded.num_classes == 3
    assert torch.equal(loaded.model.classifier.weight, model.classifier.weight)
    with pytest.raises(WandaError, match="does not fit"):
        load_classifier("vit_small_patch16_224", str(tmp_path / "vit.pth"), "transformers", num_classes=3)


@pytest.mark.parametrize("build", [tiny_vit, tiny_convnext], ids=["vit", "convnext"])
def test_command_end_to_end(tmp_path, build, capsys):
    from wanda.cli.main import main as wanda_main
    from wanda.cli.main import run as run_command
    from wanda.jobs.vision import RESULTS_FILE

    def run(argv, prog):
        return run_command(["vision", *argv], "wanda")

    def main(argv, prog):
        wanda_main(["vision", *argv], "wanda")

    model = build(num_labels=5)
    model.save_pretrained(tmp_path / "dense")
    data = write_image_tree(tmp_path / "data")
    argv = [
        "--model",
        "tiny",
        "--resume",
        str(tmp_path / "dense"),
        "--data_path",
        str(data),
        "--nsamples",
        "8",
        "--batch_size",
        "4",
        "--workers",
        "0",
        "--prune_metric",
        "wanda",
        "--prune_granularity",
        "row",
        "--sparsity",
        "0.5",
        "--save",
        str(tmp_path / "out"),
        "--save_model",
        str(tmp_path / "pruned"),
        "--no_progress",
    ]
    assert run(argv, "wanda vision") == 0
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "| pruned |" in printed and "actual sparsity 0.5000" in printed
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert results["prune"]["actual_sparsity"] == 0.5 and results["prune"]["calibration_images"] == 8
    assert set(results["accuracy"]["pruned"]) == {"top1", "top5", "loss", "images"}
    assert results["accuracy"]["pruned"]["images"] == 20

    pruned = load_classifier("tiny", str(tmp_path / "pruned"))
    assert torch.equal(pruned.model.classifier.weight, model.classifier.weight)
    for name, layer in find_layout(pruned.model).prunable.items():
        zeros = matrix_view(layer) == 0
        assert (zeros.sum(1) == zeros.shape[1] // 2).all(), name
    assert (tmp_path / "pruned" / "preprocessor_config.json").is_file()

    with pytest.raises(SystemExit) as exit_info:  # outputs are never silently replaced
        main(argv, "wanda vision")
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_command_reports_bad_flags_in_one_line(tmp_path, capsys):
    from wanda.cli.main import main as wanda_main

    def main(argv, prog):
        wanda_main(["vision", *argv], "wanda")

    data = write_image_tree(tmp_path / "data", classes=2, per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data_path", str(data), "--prune_metric", "sparsegpt"], "wanda vision")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--prune_metric" in err and "invalid choice: 'sparsegpt'" in err and "magnitude" in err
    with pytest.raises(SystemExit):
        main(["--data_path", str(tmp_path / "missing")], "wanda vision")
    assert "has no train/ folder" in capsys.readouterr().err


# --- the original code's checkpoints (official ConvNeXt, timm ViT / DeiT) without timm ------------------------------------
# The references below are independent re-implementations of the original forward passes, written from the
# papers' definitions on the original key names; the converted transformers model must give the same logits.

import torch.nn.functional as F  # noqa: E402

from wanda.vision.convert import CONFIG_OVERRIDES, checkpoint_format, to_transformers  # noqa: E402


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=g) * 0.3
        out[key] = (
            value + 1
            if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", ".1.weight")) and len(shape) == 1
            else value
        )
    return out


def timm_vit_state(depth=2, dim=16, mlp=32, patch=4, tokens=16, classes=5, distilled=False) -> dict:
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens + 1 + distilled, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    if distilled:
        shapes |= {"dist_token": (1, 1, dim), "head_dist.weight": (classes, dim), "head_dist.bias": (classes,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes |= {
            p + "norm1.weight": (dim,),
            p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,),
            p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (mlp, dim),
            p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (dim, mlp),
            p + "mlp.fc2.bias": (dim,),
        }
    return random_state(shapes)


def timm_vit_reference(sd: dict, x: torch.Tensor, depth: int, heads: int, patch: int, distilled: bool) -> torch.Tensor:
    """ViT (Dosovitskiy et al.) / DeiT on timm's keys: pre-norm blocks, fused qkv, class token (and distillation
    token, whose head's logits are averaged with the class token's at inference)."""
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    extra = [sd["cls_token"].expand(b, -1, -1)] + ([sd["dist_token"].expand(b, -1, -1)] if distilled else [])
    t = torch.cat(extra + [t], dim=1) + sd["pos_embed"]  # (B, N, D)
    dim = t.shape[-1]
    hd = dim // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        q, k, v = (
            F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            .view(b, -1, 3, heads, hd)
            .permute(2, 0, 3, 1, 4)
        )  # each (B, heads, N, hd)
        a = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(b, -1, dim), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    logits = F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])
    if distilled:
        logits = (logits + F.linear(t[:, 1], sd["head_dist.weight"], sd["head_dist.bias"])) / 2
    return logits


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit-distilled"])
def test_timm_vit_checkpoint_converts_exactly(distilled):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    sd = timm_vit_state(distilled=distilled)
    assert checkpoint_format(sd) == "vit_timm"
    kw = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_labels=5,
        **CONFIG_OVERRIDES,
    )
    model = (
        DeiTForImageClassificationWithTeacher(DeiTConfig(**kw))
        if distilled
        else ViTForImageClassification(ViTConfig(**kw))
    ).eval()
    model.load_state_dict(to_transformers(sd, model))  # strict: every key is produced, none is left over
    x = images(2, 16)
    with torch.no_grad():
        assert_close(model(pixel_values=x).logits, timm_vit_reference(sd, x, 2, 2, 4, distilled), rtol=1e-4)


def official_convnext_state(depths=(1, 2), dims=(8, 16), classes=5) -> dict:
    shapes = {
        "downsample_layers.0.0.weight": (dims[0], 3, 4, 4),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],),
        "downsample_layers.0.1.bias": (dims[0],),
        "norm.weight": (dims[-1],),
        "norm.bias": (dims[-1],),
        "head.weight": (classes, dims[-1]),
        "head.bias": (classes,),
    }
    for i, (depth, dim) in enumerate(zip(depths, dims)):
        if i:
            d = f"downsample_layers.{i}."
            shapes |= {
                d + "0.weight": (dims[i - 1],),
                d + "0.bias": (dims[i - 1],),
                d + "1.weight": (dim, dims[i - 1], 2, 2),
                d + "1.bias": (dim,),
            }
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes |= {
                p + "gamma": (dim,),
                p + "dwconv.weight": (dim, 1, 7, 7),
                p + "dwconv.bias": (dim,),
                p + "norm.weight": (dim,),
                p + "norm.bias": (dim,),
                p + "pwconv1.weight": (4 * dim, dim),
                p + "pwconv1.bias": (4 * dim,),
                p + "pwconv2.weight": (dim, 4 * dim),
                p + "pwconv2.bias": (dim,),
            }
    return random_state(shapes)


def official_convnext_reference(sd: dict, x: torch.Tensor, depths) -> torch.Tensor:
    """ConvNeXt (Liu et al. 2022) on the official keys: 4x4 stem, channels-first LayerNorm before each 2x2
    downsampling, blocks of dwconv 7x7 -> LN -> Linear 4x -> GELU -> Linear -> gamma, global pool, LN, head."""

    def norm_channels_first(t, prefix):  # LayerNorm over the channel dimension of (B, C, H, W)
        return F.layer_norm(
            t.permute(0, 2, 3, 1), (t.shape[1],), sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-6
        ).permute(0, 3, 1, 2)

    for i, depth in enumerate(depths):
        if i == 0:
            x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=4)
            x = norm_channels_first(x, "downsample_layers.0.1")
        else:
            x = norm_channels_first(x, f"downsample_layers.{i}.0")
            x = F.conv2d(x, sd[f"downsample_layers.{i}.1.weight"], sd[f"downsample_layers.{i}.1.bias"], stride=2)
        for j in range(depth):
            p = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"]))
            y = F.linear(y, sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * y).permute(0, 3, 1, 2)
    pooled = F.layer_norm(x.mean(dim=(2, 3)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(pooled, sd["head.weight"], sd["head.bias"])


def test_official_convnext_checkpoint_converts_exactly():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    sd = official_convnext_state()
    assert checkpoint_format(sd) == "convnext_official"
    model = ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, num_labels=5, **CONFIG_OVERRIDES)
    ).eval()
    model.load_state_dict(to_transformers(sd, model))
    x = images(2, 32)
    with torch.no_grad():
        assert_close(model(pixel_values=x).logits, official_convnext_reference(sd, x, (1, 2)), rtol=1e-4)


def test_original_checkpoint_loads_by_name_without_timm(tmp_path):
    # vit_tiny_patch16_224's real shapes: 12 blocks of width 192, 196 patches, in the original code's {"model": ...} wrapper
    sd = timm_vit_state(depth=12, dim=192, mlp=768, patch=16, tokens=196, classes=5)
    torch.save({"model": sd}, tmp_path / "seed.pth")
    loaded = load_classifier("vit_tiny_patch16_224", str(tmp_path / "seed.pth"), "transformers", num_classes=5)
    assert loaded.model.config.layer_norm_eps == 1e-6
    x = images(1, 224)
    with torch.no_grad():
        assert_close(loaded.forward(loaded.model, x), timm_vit_reference(sd, x, 12, 3, 16, False), rtol=1e-4)
    with pytest.raises(WandaError, match="checkpoint is a vit"):
        load_classifier("convnext_tiny", str(tmp_path / "seed.pth"), "transformers", num_classes=5)


# --- the timm path, through a stand-in module (timm itself needs a torchvision that matches torch) ----------------


@pytest.fixture
def stub_timm(monkeypatch):
    import importlib.machinery
    import sys
    import types

    class TimmNet(PointwiseNet):
        def __init__(self, num_classes: int):
            super().__init__(classes=num_classes)
            self.num_classes = num_classes
            self.pretrained_cfg = {
                "classifier": "head",
                "input_size": (3, 16, 16),
                "crop_pct": 0.8,
                "interpolation": "bilinear",
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
            }

    calls = []

    def create_model(name, pretrained=False, num_classes=1000):
        calls.append((name, pretrained, num_classes))
        return TimmNet(num_classes)

    stub = types.ModuleType("timm")
    stub.__spec__ = importlib.machinery.ModuleSpec("timm", None)
    stub.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", stub)
    return calls


def test_timm_path_loads_prunes_and_saves(stub_timm, tmp_path, capsys):
    from wanda.cli.main import run as run_command

    def run(argv, prog):
        return run_command(["vision", *argv], "wanda")

    torch.save({"model": PointwiseNet(classes=5).state_dict()}, tmp_path / "seed.pth")
    loaded = load_classifier("pointwise_net", str(tmp_path / "seed.pth"), num_classes=5)
    assert loaded.library == "timm" and stub_timm == [("pointwise_net", False, 5)]
    assert loaded.preprocess == Preprocess(20, (16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

    data = write_image_tree(tmp_path / "data")
    argv = [
        "--model",
        "pointwise_net",
        "--resume",
        str(tmp_path / "seed.pth"),
        "--data_path",
        str(data),
        "--nsamples",
        "6",
        "--workers",
        "0",
        "--sparsity_type",
        "2:4",
        "--save_model",
        str(tmp_path / "pruned"),
        "--no_progress",
        "--library",
        "timm",
    ]
    assert run(argv, "wanda vision") == 0
    assert "[timm]" in capsys.readouterr().out
    again = load_classifier("pointwise_net", str(tmp_path / "pruned" / "checkpoint.pth"), "timm", num_classes=5)
    for layer in find_layout(again.model).prunable.values():
        assert check_nm(matrix_view(layer) == 0, 2, 4)
    assert torch.equal(again.model.head.weight, loaded.model.head.weight)


def test_topk_accuracy_by_hand():
    from wanda.vision import topk_accuracy

    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 5, 4, 3, 2, 1]])
    labels = torch.tensor([0, 0, 5])  # top-1 hit; in no top-5; in the top-5 only
    model = nn.Linear(1, 1)  # only its device is read
    out = topk_accuracy(model, [(logits, labels)], lambda m, x: x, progress=False)
    assert out["top1"] == pytest.approx(100 / 3) and out["top5"] == pytest.approx(200 / 3) and out["images"] == 3
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())


def test_hooks_are_removed_when_a_forward_fails():
    model = tiny_vit()

    def failing(m, x):
        m(pixel_values=x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prune_classifier(model, [images(2, 16)], settings(metric="wanda"), failing)
    for layer in find_layout(model).prunable.values():
        assert not layer._forward_pre_hooks
        assert torch.count_nonzero(matrix_view(layer)) == matrix_view(layer).numel()  # nothing was pruned


# --- images that cannot be decoded -------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _broken(path: Path, kind: str) -> None:
    if kind == "truncated":
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "bomb":  # over twice the limit: PIL itself refuses
        path.write_bytes(png_declaring(20000, 20000))
    else:  # over the limit, under twice it: PIL only warns, which is made an error
        path.write_bytes(png_declaring(10000, 10000))


@pytest.mark.parametrize("kind, words", [("truncated", "cannot decode image"), ("bomb", "is too large to decode"),
                                         ("over_limit", "is too large to decode")])  # fmt: skip
def test_an_image_that_cannot_be_decoded_is_one_line_naming_it(tmp_path, kind, words):
    root = write_image_tree(tmp_path, classes=2, per_class=2)
    bad = root / "train" / "class1" / "0.png"
    _broken(bad, kind)
    folder = ImageFolder(root / "train", Preprocess(resize=16, crop=(16, 16)))
    with pytest.raises(WandaError) as info:
        folder[2]
    assert str(info.value).startswith(f"image {bad}" if words.startswith("is") else f"{words} {bad}: ")
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("kind", ["truncated", "over_limit"])
def test_the_command_names_the_bad_image_in_one_line(tmp_path, capsys, workers, kind):
    """Through ``wanda vision``, with the images decoded in the process or in a worker: exit 2 and the worker's
    error reduced to its last line."""
    from wanda.cli.main import main as wanda_main

    tiny_vit(num_labels=2).save_pretrained(tmp_path / "dense")
    root = write_image_tree(tmp_path / "data", classes=2, per_class=2)
    bad = root / "train" / "class1" / "1.png"
    _broken(bad, kind)
    argv = ["vision", "--model", "tiny", "--resume", str(tmp_path / "dense"), "--data_path", str(root),
            "--nsamples", "4", "--batch_size", "4", "--workers", str(workers), "--prune_metric", "wanda",
            "--sparsity", "0.5", "--no_progress"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        wanda_main(argv, "wanda")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(bad) in errors[0] and "DataLoader" not in err, errors[0]
