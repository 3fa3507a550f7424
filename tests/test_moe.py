"""Mixtures of experts and the not-pruned report, on tiny random Mixtral, Qwen2-MoE and gpt-oss decoders.

In the installed transformers all three store their experts as fused 3-D parameters (Mixtral and Qwen2-MoE
as (experts, out, in) with [gate; up] concatenated, gpt-oss transposed as (experts, in, out) with gate and up
interleaved and with biases); Qwen2-MoE adds a shared expert (ordinary linears) behind a sigmoid gate.
The expected masks are computed here from scratch: routing is the top-k of the router's logits on the block's
input, each expert's down-projection input is its activation computed by hand.
"""

from __future__ import annotations

import copy
import functools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, calib_ids, one_thread, tiny_model
from torch import nn

from wanda import PruneSettings, WandaError, model_sparsity, prune
from wanda.models import StructureOverride, find_decoder_layout
from wanda.pruning.prune import NO_TOKEN_RULE

MOE_ARCHS = ["mixtral", "qwen2_moe", "gpt_oss"]
EXPERTS, TOP_K, HIDDEN, INTER = 4, 2, 64, 32


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def moe_config(arch: str, top_k: int = TOP_K):
    from transformers import GptOssConfig, MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts_per_tok=top_k,
    )
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=INTER, num_local_experts=EXPERTS, **common)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            moe_intermediate_size=INTER,
            shared_expert_intermediate_size=48,
            num_experts=EXPERTS,
            intermediate_size=96,
            decoder_sparse_step=1,
            **common,
        )
    if arch == "gpt_oss":
        return GptOssConfig(intermediate_size=INTER, num_local_experts=EXPERTS, head_dim=16, **common)
    raise ValueError(arch)


@functools.lru_cache(maxsize=None)
def _original(arch: str, starved: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch, 1 if starved else TOP_K), dtype=torch.float32).eval()
    model.config.use_cache = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "router" not in name and not name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)  # the experts are initialised empty or tiny; give every matrix distinct values
        if starved:
            _starve_last_expert(model)
    return model


def _router(block: nn.Module) -> nn.Module:
    return block.mlp.router if hasattr(block.mlp, "router") else block.mlp.gate


def _starve_last_expert(model: nn.Module) -> None:
    """Top-1 routing with router rows (v, -v, u, 0) and no bias: one of +-v.x is positive, so the last
    expert's logit of exactly 0 never wins."""
    for block in find_decoder_layout(model).blocks:
        router = _router(block)
        v, u = torch.randn(2, HIDDEN)
        router.weight.data = torch.stack([v, -v, u, torch.zeros(HIDDEN)])
        if getattr(router, "bias", None) is not None:
            router.bias.data.zero_()


def _fresh(arch: str, starved: bool = False) -> nn.Module:
    return copy.deepcopy(_original(arch, starved))


@torch.no_grad()
def _routed_inputs(model: nn.Module, arch: str, index: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our own computation: block ``index``'s MoE input, routed by hand; (tokens, in) per expert matrix input."""
    block = find_decoder_layout(model).blocks[index]
    seen: list[torch.Tensor] = []
    handle = block.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(input_ids=batch)
    finally:
        handle.remove()
    x = torch.cat([s.reshape(-1, HIDDEN) for s in seen]).double()
    router = _router(block)
    logits = x @ router.weight.double().T + (router.bias.double() if getattr(router, "bias", None) is not None else 0)
    chosen = logits.topk(TOP_K, dim=-1).indices  # softmax is monotonic: top-k of the probabilities is this
    experts = block.mlp.experts
    prefix = f"model.layers.{index}.mlp.experts"
    out = {}
    for e in range(EXPERTS):
        xe = x[(chosen == e).any(dim=-1)]
        if arch == "gpt_oss":  # (in, out) layout, interleaved gate/up, biases, clamped SwiGLU with alpha
            gu = xe @ experts.gate_up_proj[e].double() + experts.gate_up_proj_bias[e].double()
            gate, up = gu[:, ::2].clamp(max=experts.limit), gu[:, 1::2].clamp(-experts.limit, experts.limit)
            h = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
        else:
            gu = xe @ experts.gate_up_proj[e].double().T
            h = F.silu(gu[:, :INTER]) * gu[:, INTER:]
        out[f"{prefix}.gate_up_proj[{e}]"] = xe
        out[f"{prefix}.down_proj[{e}]"] = h
    return out


def _row_mask(scores: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """The lowest floor(ratio * cols) scores of each row (stable order), in numpy: independent of wanda.masks."""
    s = scores.numpy()
    mask = np.zeros(s.shape, dtype=bool)
    k = int(ratio * s.shape[1])
    for r, row in enumerate(s):
        mask[r, np.argsort(row, kind="stable")[:k]] = True
    return torch.from_numpy(mask)


def _expert_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    layout = find_decoder_layout(model)
    return {
        name: m.weight
        for i in range(len(layout.blocks))
        for name, m in layout.matrices(i).prunable.items()
        if m.expert is not None
    }


def _input_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".gate", ".up")) else name


# (1) every expert matrix at the exact ratio or N:M pattern; routers and norms untouched -------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_matrix_pruned_exactly_and_routers_untouched(arch, method, pattern):
    original = _original(arch)
    model = _fresh(arch)
    report = prune(
        model, calib_ids(8, 16), PruneSettings(prune_method=method, sparsity_type=pattern), progress=False, batch_size=4
    )

    experts = _expert_matrices(model)
    # 2 blocks x 4 experts x (gate, up, down)
    assert len(experts) == 2 * EXPERTS * 3
    assert {l.name for l in report.layers} >= set(experts)
    for name, weight in {n: m for n, m in model_sparsity_matrices(model).items()}.items():
        rows, cols = weight.shape
        if pattern == "2:4":
            zeros = (weight.reshape(rows, cols // 4, 4) == 0).sum(-1)
            assert bool((zeros == 2).all()), name
        else:
            assert int((weight == 0).sum()) == rows * cols // 2, name
    # routers, the shared expert's gate, norms and biases: bit for bit the originals
    pruned_names = {l.name for l in report.layers}
    reference = dict(original.named_parameters())
    for item in report.not_pruned:
        assert torch.equal(model.get_parameter(item.name), reference[item.name]), item.name
    reasons = {item.name.split(".", 3)[-1]: item.reason for item in report.not_pruned if ".0." in item.name}
    router = "mlp.router.weight" if arch == "gpt_oss" else "mlp.gate.weight"
    assert reasons[router] == "router"
    assert reasons["input_layernorm.weight"] == "norm"
    if arch == "qwen2_moe":
        assert reasons["mlp.shared_expert_gate.weight"] == "router"
        assert {
            "model.layers.0.mlp.shared_expert.gate_proj",
            "model.layers.0.mlp.shared_expert.down_proj",
        } <= pruned_names
    # every parameter of every block is either pruned or listed, and nothing twice
    block_params = sum(p.numel() for p in find_decoder_layout(model).blocks.parameters())
    assert (
        sum(l.shape[0] * l.shape[1] for l in report.layers) + sum(int(np.prod(i.shape)) for i in report.not_pruned)
        == block_params
    )
    # reported sparsity: zeros over exactly the pruned matrices, counted here from the model
    weights = model_sparsity_matrices(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert report.actual_sparsity == pytest.approx(zeros / total, rel=1e-12)
    assert f"the {len(weights)} pruned weight matrices" in report.to_dict()["sparsity_over"]
    assert report.to_dict()["matrices_without_tokens"] == []


def model_sparsity_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    layout = find_decoder_layout(model)
    return {name: m.weight for i in range(len(layout.blocks)) for name, m in layout.matrices(i).prunable.items()}


# (2) Wanda's per-expert mask from the tokens routed to that expert ----------------------------------------


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_wanda_expert_masks_come_from_the_tokens_routed_to_each_expert(arch):
    original = _original(arch)
    model = _fresh(arch)
    ids = calib_ids(8, 16)
    report = prune(model, ids, PruneSettings(prune_method="wanda", sparsity_ratio=0.5), progress=False, batch_size=4)
    tokens = {l.name: l.tokens for l in report.layers}
    pruned = _expert_matrices(model)
    before = _expert_matrices(original)
    for index in range(2):
        # block i is calibrated on what the pruned blocks before it produce: a reference with those blocks pruned
        reference = copy.deepcopy(original)
        for j in range(index):
            find_decoder_layout(reference).blocks[j].load_state_dict(find_decoder_layout(model).blocks[j].state_dict())
        inputs = _routed_inputs(reference, arch, index, ids)
        counts = [inputs[f"model.layers.{index}.mlp.experts.gate_up_proj[{e}]"].shape[0] for e in range(EXPERTS)]
        assert sum(counts) == ids.numel() * TOP_K and min(counts) > 0
        for name, weight in pruned.items():
            if not name.startswith(f"model.layers.{index}."):
                continue
            x = inputs[_input_of(name)]
            assert tokens[name] == x.shape[0], name
            expected = _row_mask(before[name].double().abs() * x.square().sum(0).sqrt())
            assert torch.equal(weight == 0, expected), name
            assert torch.equal(weight[~expected], before[name][~expected]), name


def test_fused_experts_are_tapped_under_the_default_grouped_kernel_and_released():
    model = _fresh("mixtral")
    assert model.config._experts_implementation != "eager"  # transformers' default dispatches to a grouped kernel
    experts = find_decoder_layout(model).blocks[0].mlp.experts
    prune(model, calib_ids(4, 16), PruneSettings(prune_method="wanda"), progress=False, batch_size=4)
    assert "forward" not in experts.__dict__  # the wrapper is gone
    with torch.no_grad():  # and the model still runs through its own dispatch
        assert model(input_ids=calib_ids(1, 8)).logits.isfinite().all()


# (3) an expert that received no calibration token -------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_expert_without_tokens_is_reported_and_pruned_by_magnitude(arch, method, caplog):
    original = _original(arch, starved=True)
    model = _fresh(arch, starved=True)
    ids = calib_ids(8, 16)
    with caplog.at_level(logging.INFO, logger="wanda"):
        report = prune(model, ids, PruneSettings(prune_method=method, sparsity_ratio=0.5), progress=False, batch_size=4)
    starved = {l.name for l in report.layers if l.rule is not None}
    expected = {
        f"model.layers.{i}.mlp.experts.{m}"
        for i in range(2)
        for m in ("gate_up_proj[3].gate", "gate_up_proj[3].up", "down_proj[3]")
    }
    assert starved == expected
    assert all(l.tokens == 0 and l.rule == NO_TOKEN_RULE for l in report.layers if l.name in starved)
    assert all(l.tokens > 0 for l in report.layers if l.name not in starved)
    assert sorted(report.to_dict()["matrices_without_tokens"]) == sorted(expected)
    assert any("read no calibration token" in r.getMessage() for r in caplog.records)
    pruned, before = _expert_matrices(model), _expert_matrices(original)
    for name in starved:
        w0, w = before[name], pruned[name]
        if method == "wanda":  # |W| compared within each output row
            mask = _row_mask(w0.abs())
        else:  # |W| over the whole matrix (one OBS block of columns), and no weight update
            flat = np.argsort(w0.abs().flatten().numpy(), kind="stable")[: w0.numel() // 2]
            mask = torch.zeros(w0.numel(), dtype=torch.bool)
            mask[torch.from_numpy(flat)] = True
            mask = mask.reshape(w0.shape)
        assert torch.equal(w == 0, mask), name
        assert torch.equal(w[~mask], w0[~mask]), name


# (4) nothing skipped silently: an unsupported layout in the report and the log ---------------------------


def test_unsupported_layout_is_listed_in_report_and_log(caplog):
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("llama")
    block = find_decoder_layout(model).blocks[0]
    dense = block.mlp.down_proj
    conv = Conv1D(dense.out_features, dense.in_features)  # GPT-2 style: weight stored (in, out)
    conv.weight.data = dense.weight.data.T.contiguous()
    conv.bias.data.zero_()
    block.mlp.down_proj = conv
    with caplog.at_level(logging.INFO, logger="wanda"):
        report = prune(model, calib_ids(4, 16), PruneSettings(prune_method="wanda"), progress=False, batch_size=4)
    listed = {i.name: i for i in report.not_pruned}
    item = listed["model.layers.0.mlp.down_proj.weight"]
    assert item.reason == "unsupported layout: 2-D parameter of Conv1D" and item.shape == (128, 64)
    assert listed["model.layers.0.mlp.down_proj.bias"].reason == "bias or other vector"
    assert "model.layers.0.mlp.down_proj" not in {l.name for l in report.layers}
    assert "model.layers.1.mlp.down_proj" in {l.name for l in report.layers}
    assert torch.equal(conv.weight, dense.weight.data.T)  # untouched
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("not pruned:"))
    assert "unsupported layout: 2-D parameter of Conv1D: 1 (e.g. model.layers.0.mlp.down_proj.weight)" in line
    assert "norm: " in line
    assert report.to_dict()["not_pruned"][0].keys() == {"name", "shape", "reason"}


# (5) the override, and an architecture without findable blocks --------------------------------------------


class _Flat(nn.Module):
    """Blocks behind a plain attribute list no generic rule can find (not a ModuleList)."""

    def __init__(self):
        super().__init__()
        self.stack = nn.Sequential(*(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)))

    def forward(self, x):
        return self.stack(x)


def test_unfindable_blocks_name_the_model_class_and_the_override_fixes_it():
    model = _Flat()
    with pytest.raises(WandaError, match=r"^_Flat is not supported: .*StructureOverride") as info:
        prune(model, None, PruneSettings(prune_method="magnitude"), progress=False)
    assert "\n" not in str(info.value)
    report = prune(
        model,
        None,
        PruneSettings(prune_method="magnitude"),
        progress=False,
        structure=StructureOverride(blocks="stack", prune=("0",)),
    )
    assert [l.name for l in report.layers] == ["stack.0.0", "stack.1.0"]
    excluded = {i.name: i.reason for i in report.not_pruned}
    assert excluded["stack.0.2.weight"] == "excluded by the structure override"
    assert int((model.stack[0][0].weight == 0).sum()) == 64 and int((model.stack[0][2].weight == 0).sum()) == 0
    with pytest.raises(WandaError, match="structure override: _Flat has no module 'layers'"):
        prune(
            model,
            None,
            PruneSettings(prune_method="magnitude"),
            progress=False,
            structure=StructureOverride(blocks="layers"),
        )


def test_override_limits_pruning_to_matching_matrices_of_experts():
    model = _fresh("mixtral")
    report = prune(
        model,
        calib_ids(4, 16),
        PruneSettings(prune_method="wanda"),
        progress=False,
        batch_size=4,
        structure=StructureOverride(prune=("mlp.experts.down_proj",)),
    )
    assert {l.name for l in report.layers} == {
        f"model.layers.{i}.mlp.experts.down_proj[{e}]" for i in range(2) for e in range(EXPERTS)
    }
    sparsity = model_sparsity(model, StructureOverride(prune=("mlp.experts.down_proj",)))
    assert set(sparsity.values()) == {0.5}
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, _original("mixtral").model.layers[0].self_attn.q_proj.weight
    )


# (6) a saved MoE model loads with plain from_pretrained and keeps its zeros -------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_saved_moe_model_keeps_its_zeros(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from wanda.export import save_model

    model = _fresh(arch)
    prune(
        model, calib_ids(4, 16), PruneSettings(prune_method="wanda", sparsity_type="2:4"), progress=False, batch_size=4
    )
    save_model(model, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    for name, p in model.named_parameters():
        assert torch.equal(reloaded.get_parameter(name), p), name
    assert model_sparsity(reloaded) == model_sparsity(model)
    assert set(model_sparsity(reloaded).values()) == {0.5}
    # the compact format stores each fused expert parameter as one bitmask-encoded tensor
    from wanda.models.compressed import load_compressed

    saved = save_model(model, None, tmp_path / "compact", "compressed")
    assert saved.compression.encodings["model.layers.0.mlp.experts.down_proj"] == "bitmask"
    compact, _ = load_compressed(tmp_path / "compact", dtype=torch.float32, device=torch.device("cpu"))
    for name, p in model.named_parameters():
        assert torch.equal(compact.get_parameter(name), p), name


# (7) experts as nn.Linear modules (remote-code style): pre-hooks see only the routed tokens ----------------


class _LinearExpertsMoE(nn.Module):
    """Top-1 routing over experts that are ordinary gated MLPs; an expert without tokens is never called."""

    def __init__(self, hidden: int, inter: int, experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(hidden, inter, bias=False),
                    "up_proj": nn.Linear(hidden, inter, bias=False),
                    "down_proj": nn.Linear(inter, hidden, bias=False),
                }
            )
            for _ in range(experts)
        )

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(-1)
            if rows.numel():
                h = flat[rows]
                out[rows] = expert["down_proj"](F.silu(expert["gate_proj"](h)) * expert["up_proj"](h))
        return out.reshape(x.shape)


def test_linear_experts_get_their_routed_tokens_and_the_no_token_rule():
    model = tiny_model("llama")
    torch.manual_seed(1)
    for block in model.model.layers:
        block.mlp = _LinearExpertsMoE(64, 32, EXPERTS)
        v, u = torch.randn(2, 64)
        block.mlp.gate.weight.data = torch.stack([v, -v, u, torch.zeros(64)])  # expert 3 never wins
    original = copy.deepcopy(model)
    ids = calib_ids(8, 16)
    routed: dict[str, torch.Tensor] = {}
    block0 = original.model.layers[0].mlp
    handle = block0.register_forward_pre_hook(lambda m, a: routed.update(x=a[0].reshape(-1, 64).detach()))
    with torch.no_grad():
        original(input_ids=ids)
    handle.remove()
    report = prune(model, ids, PruneSettings(prune_method="wanda"), progress=False, batch_size=8)
    layers = {l.name: l for l in report.layers}
    assert "model.layers.0.mlp.gate" not in layers
    assert {i.reason for i in report.not_pruned if i.name == "model.layers.0.mlp.gate.weight"} == {"router"}
    x = routed["x"].double()
    choice = (x @ block0.gate.weight.double().T).argmax(-1)
    for e in range(EXPERTS):
        name = f"model.layers.0.mlp.experts.{e}.up_proj"
        w0 = block0.experts[e]["up_proj"].weight.detach()
        if e == 3:
            assert layers[name].tokens == 0 and layers[name].rule == NO_TOKEN_RULE
            expected = _row_mask(w0.abs())
        else:
            xe = x[choice == e]
            assert layers[name].tokens == xe.shape[0] > 0
            expected = _row_mask(w0.double().abs() * xe.square().sum(0).sqrt())
        assert torch.equal(model.model.layers[0].mlp.experts[e]["up_proj"].weight == 0, expected), name


def test_finetune_masks_cover_fused_experts():
    from wanda.finetune.masks import apply_masks, capture_masks

    model = _fresh("mixtral")
    prune(model, calib_ids(4, 16), PruneSettings(prune_method="magnitude"), progress=False)
    masks = capture_masks(model)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert masks[key].shape == (EXPERTS, 2 * INTER, HIDDEN) and int(masks[key].sum()) == masks[key].numel() // 2
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.add_(1.0)  # "training" revives every zero
    apply_masks(model, masks)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj == 0, masks[key])


# (8) the command line: the report in the results JSON and the log; blocks not found: exit 2, one line ---------


def _save_with_tokenizer(model: nn.Module, folder) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)


def test_cli_reports_what_was_not_pruned_and_exits_2_without_blocks(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import word_corpus

    corpus = word_corpus(tmp_path / "corpus.txt", words=2000)
    _save_with_tokenizer(_fresh("mixtral"), tmp_path / "mixtral")
    _save_with_tokenizer(tiny_model("llama", num_hidden_layers=0), tmp_path / "no-blocks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")

    def run(model: str, save: str) -> subprocess.CompletedProcess:
        args = [
            "--model",
            str(tmp_path / model),
            "--calib_dataset",
            str(corpus),
            "--eval_dataset",
            str(corpus),
            "--seqlen",
            "32",
            "--nsamples",
            "4",
            "--eval_windows",
            "1",
            "--device",
            "cpu",
            "--prune_method",
            "wanda",
            "--save",
            str(tmp_path / save),
        ]
        return subprocess.run(
            [sys.executable, "-m", "wanda.main"] + args, env=env, capture_output=True, text=True, timeout=300
        )

    proc = run("mixtral", "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results_wanda.json").read_text())["prune"]
    reasons = {i["name"]: i["reason"] for i in results["not_pruned"]}
    assert reasons["model.layers.1.mlp.gate.weight"] == "router"
    assert len([l for l in results["layers"] if ".experts." in l["name"]]) == 2 * EXPERTS * 3
    assert results["actual_sparsity"] == 0.5 and results["sparsity_over"].startswith("the 32 pruned weight matrices")
    lines = [
        line
        for line in proc.stderr.splitlines()
        if "not pruned: router: 2 (e.g. model.layers.0.mlp.gate.weight)" in line
    ]
    assert len(lines) == 1

    proc = run("no-blocks", "out2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("wanda: error: LlamaForCausalLM is not supported: found no decoder blocks")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_perplexity_of_a_moe_model_is_its_own_loss(arch):
    from wanda import perplexity

    model = _fresh(arch)
    ids = calib_ids(2, 16)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, ids, batch_size=2, chunk_tokens=8, progress=False) == pytest.approx(np.exp(loss), rel=1e-5)


class _AllExpertsAtOnce(nn.Module):
    """A fused-experts layout whose forward never indexes one expert (one einsum over all of them)."""

    num_experts = EXPERTS

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(EXPERTS, HIDDEN, HIDDEN) * 0.1)

    def forward(self, x):
        return torch.einsum("bsd,eod->bso", x, self.w) / EXPERTS


def test_fused_experts_whose_inputs_cannot_be_seen_are_listed_not_pruned(caplog):
    model = tiny_model("llama")
    model.model.layers[0].mlp = _AllExpertsAtOnce()
    before = model.model.layers[0].mlp.w.detach().clone()
    with caplog.at_level(logging.INFO, logger="wanda"):
        report = prune(model, calib_ids(4, 16), PruneSettings(prune_method="wanda"), progress=False, batch_size=4)
    listed = {i.name: i.reason for i in report.not_pruned}
    assert [listed[f"model.layers.0.mlp.w[{e}]"] for e in range(EXPERTS)] == [
        "unsupported layout: its per-expert inputs could not be observed"
    ] * EXPERTS
    assert torch.equal(model.model.layers[0].mlp.w, before)
    assert not any(l.name.startswith("model.layers.0.mlp.w") for l in report.layers)
    assert any(
        "its per-expert inputs could not be observed: 4 (e.g. model.layers.0.mlp.w[0])" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_checkpoint_in_the_per_expert_layout_streams_as_it_loads(tmp_path, arch, method):
    """``save_pretrained`` writes some families per expert (Mixtral's w1/w2/w3) and ``from_pretrained`` fuses them
    with transformers' conversion mapping; streamed pruning reads the same checkpoint block by block through that
    mapping, and ends with the weights of the in-memory run, bit for bit."""
    from conftest import save_tiny

    from wanda.engine.streaming import StreamSettings
    from wanda.models import load_model
    from wanda.pruning.streamed import prune_streamed

    folder = save_tiny(tmp_path, "llama")  # the word tokenizer, then the mixture's config and weights
    for old in folder.glob("model*.safetensors"):
        old.unlink()
    _original(arch).save_pretrained(folder)
    settings, ids = PruneSettings(prune_method=method), calib_ids(4, 16)
    memory = load_model(str(folder), device="cpu").model
    prune(memory, ids, settings, batch_size=2, progress=False)
    out = tmp_path / "streamed"
    prune_streamed(folder, ids, settings, StreamSettings(offload="disk"), save_model=out, batch_size=2, progress=False)
    streamed = load_model(str(out), device="cpu").model.state_dict()
    expected = memory.state_dict()
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_eval_reports_the_sparsity_the_prune_report_gave_fused_experts_included(tmp_path, offload, capsys):
    # one count behind every figure: wanda eval on a saved MoE model, in memory or streamed, reports exactly
    # the prune report's sparsity, whose matrices include each expert's slice of the fused parameters; the
    # attention matrices get another ratio, so a count over the experts alone (0.6) or over the nn.Linear
    # layers alone (0.3) would differ
    import json

    from conftest import word_corpus

    from wanda.cli.main import main

    model = _fresh("mixtral")
    settings = PruneSettings(prune_method="magnitude", sparsity_ratio=0.6, target_ratios=["self_attn=0.3"])
    report = prune(model, None, settings, progress=False)
    _save_with_tokenizer(model, tmp_path / "pruned")
    corpus = word_corpus(tmp_path / "corpus.txt", words=500)
    argv = ["eval", "--model", str(tmp_path / "pruned"), "--eval_dataset", str(corpus), "--seqlen", "16"]
    argv += ["--eval_windows", "1", "--device", "cpu", "--offload", offload, "--save", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv, "wanda")
    assert exit_info.value.code == 0, capsys.readouterr().err
    reported = json.loads((tmp_path / "out" / "results_eval.json").read_text())["linear_sparsity"]
    assert _expert_matrices(model), "the tiny Mixtral has fused experts"
    everything = [p for n, p in model.named_parameters() if "layers." in n and p.dim() >= 2 and "gate.weight" not in n]
    zeros = sum(int((p == 0).sum()) for p in everything)
    assert reported == pytest.approx(report.actual_sparsity, rel=1e-12)
    assert reported == pytest.approx(zeros / sum(p.numel() for p in everything), rel=1e-12)
    assert 0.31 < reported < 0.59
