"""``--config`` recipe files and ``--targets`` / ``--ignore`` / ``--target_ratios``.

A recipe's values go through the same parser as flags (so they are checked the same way) and the command line
overrides them; target patterns choose matrices by regular expression, checked against the names that
``model_sparsity`` reports and, for the ratios, against an independent count of each matrix's zeros.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import calib_ids, one_thread, tiny_model

from wanda import PruneSettings, model_sparsity, prune
from wanda.cli.main import COMMANDS
from wanda.errors import WandaError
from wanda.masks.pattern import SparsityPattern

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def settings_of(argv: list[str], command: str = "") -> dict[str, object]:
    parsed = COMMANDS[command].parser("wanda").parse_settings(argv)
    return {k: v for group in parsed for k, v in group.to_dict().items()}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_recipe_sets_what_its_flags_would(tmp_path, suffix):
    recipe = {
        "prune_method": "sparsegpt",
        "sparsity_type": "unstructured",
        "sparsity_ratio": 0.6,
        "eval_dense": True,
        "ignore": ["layers\\.0\\.", "down_proj"],
        "target_ratios": {"q_proj": 0.7, "o_proj": 0.3},
        "nsamples": 16,
    }
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(recipe))
    else:
        import yaml

        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    from_file = settings_of(["--config", str(path)])
    from_flags = settings_of(
        "--prune_method sparsegpt --sparsity_type unstructured --sparsity_ratio 0.6 --eval_dense --nsamples 16 "
        "--ignore layers\\.0\\. down_proj --target_ratios q_proj=0.7 o_proj=0.3".split()
    )
    assert from_file == from_flags
    assert from_file["target_ratios"] == ["q_proj=0.7", "o_proj=0.3"]


def test_the_command_line_overrides_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("prune_method: sparsegpt\nsparsity_ratio: 0.6\nnsamples: 16\n")
    got = settings_of(["--sparsity_ratio", "0.7", f"--config={path}", "--prune_method", "wanda"])
    assert (got["prune_method"], got["sparsity_ratio"], got["nsamples"]) == ("wanda", 0.7, 16)


def test_recipes_serve_other_commands(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"eval_windows": 3, "seqlen": 64}))
    got = settings_of(["--config", str(path), "--model", "m"], "eval")
    assert (got["eval_windows"], got["seqlen"]) == (3, 64)


@pytest.mark.parametrize(
    "text, suffix, needle",
    [
        ("{not json", ".json", "not valid JSON"),
        ("- a\n- b\n", ".yaml", "must hold a mapping"),
        ('{"no_such_setting": 1}', ".json", "'no_such_setting' is not a setting"),
        ('{"sparsity_ratio": [0.5, 0.6]}', ".json", "takes one value"),
        ('{"eval_dense": "maybe"}', ".json", "--eval_dense"),  # the parser's own check of a bool flag's value
        ('{"sparsity_ratio": 1.5}', ".json", "sparsity_ratio"),  # the settings' own validation
        ("prune_method: x", ".toml", "must end in"),
    ],
)
def test_a_bad_recipe_is_one_error(tmp_path, text, suffix, needle):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    with pytest.raises(WandaError) as info:
        settings_of(["--config", str(path)])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_config_given_twice_or_missing(tmp_path):
    with pytest.raises(WandaError, match="given 2 times"):
        settings_of(["--config", "a.json", "--config", "b.json"])
    with pytest.raises(WandaError, match="needs a file"):
        settings_of(["--config"])
    with pytest.raises(WandaError, match="cannot read"):
        settings_of(["--config", str(tmp_path / "missing.yaml")])


def _expected_fraction(weight: torch.Tensor, ratio: float) -> float:
    """What per-row unstructured pruning at ``ratio`` leaves as zeros: floor(ratio * columns) per row."""
    return int(weight.shape[1] * ratio) / weight.shape[1]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_targets_ignore_and_ratios_choose_the_matrices(method):
    model = tiny_model("llama", num_hidden_layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = PruneSettings(
        prune_method=method,
        sparsity_ratio=0.5,
        targets=["mlp", "self_attn\\.[qo]_proj"],
        ignore=["layers\\.0\\."],
        target_ratios=["down_proj=0.75", "layers\\.2\\..*_proj=0.25"],
    )
    report = prune(model, calib_ids(), settings, progress=False)
    sparsity = model_sparsity(model)
    pruned = {layer.name: layer for layer in report.layers}
    for name, fraction in sparsity.items():
        weight = model.get_parameter(name + ".weight")
        chosen = re.search("mlp|self_attn\\.[qo]_proj", name) and not name.startswith("model.layers.0.")
        if not chosen:
            assert name not in pruned
            assert torch.equal(weight, before[name + ".weight"]), name  # untouched, bit for bit
            continue
        ratio = 0.75 if "down_proj" in name else 0.25 if name.startswith("model.layers.2.") else 0.5
        assert pruned[name].ratio == ratio
        if method == "magnitude":  # layer-wise scope: exactly round(ratio * numel) zeros
            assert (weight == 0).sum().item() == int(ratio * weight.numel()), name
        else:  # per-row scope
            assert fraction == pytest.approx(_expected_fraction(weight, ratio), abs=0.5 / weight.numel()), name
    left_out = {item.name for item in report.not_pruned if item.reason.startswith("left out")}
    assert left_out == {n for n in sparsity if n not in pruned}


def test_targets_that_leave_nothing_are_refused_before_work():
    model = tiny_model("llama")
    with pytest.raises(WandaError, match="leave no matrix to prune"):
        prune(model, calib_ids(), PruneSettings(targets=["no_such_matrix"]), progress=False)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"targets": ["("]}, "not a regular expression"),
        ({"target_ratios": ["q_proj"]}, "REGEX=RATIO"),
        ({"target_ratios": ["q_proj=1.0"]}, "in [0, 1)"),
        ({"target_ratios": ["q_proj=half"]}, "not a number"),
        ({"target_ratios": ["q_proj=0.5"], "sparsity_type": "2:4"}, "unstructured"),
    ],
)
def test_bad_targets_are_one_line(fields, needle):
    with pytest.raises(WandaError, match=re.escape(needle)):
        PruneSettings(**fields)


def test_nm_targets_keep_the_pattern_exact():
    model = tiny_model("llama")
    prune(model, calib_ids(), PruneSettings(sparsity_type="2:4", ignore=["k_proj"]), progress=False)
    pattern = SparsityPattern.parse("2:4")
    for name in model_sparsity(model):
        weight = model.get_parameter(name + ".weight")
        groups = (weight.reshape(weight.shape[0], -1, pattern.m) == 0).sum(-1)
        if "k_proj" in name:
            assert groups.sum() == 0
        else:
            assert bool((groups == pattern.n).all()), name
