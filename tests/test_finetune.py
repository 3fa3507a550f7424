"""Fine-tuning pruned tiny models: LoRA learns, masked merges and mask-keeping training never revive a zero."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import assert_close, save_tiny, tiny_model, word_corpus

from wanda import PruneSettings, WandaError, prune

pytest.importorskip("peft")

from wanda.data import TextSource  # noqa: E402
from wanda.finetune import (  # noqa: E402  (after the skip: the package needs peft for LoRA)
    LoraSettings,
    MaskKeepingCallback,
    SparsityLost,
    TrainSettings,
    apply_masks,
    capture_masks,
    default_target_modules,
    evaluate_perplexity,
    finetune,
    load_with_adapter,
    masked_merge,
    plain_merge_revivals,
    resolve_checkpoint,
    training_blocks,
    verify_sparsity,
)
from wanda.finetune.checkpoints import COMPLETE  # noqa: E402


def pruned_tiny(arch: str = "llama", sparsity_type: str = "unstructured"):
    model = tiny_model(arch)
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_type=sparsity_type), progress=False)
    return model


def patterned_blocks(n: int = 16, block: int = 32) -> torch.Tensor:
    """A periodic token stream (period 10): easy to learn, so a few steps visibly lower the loss."""
    stream = torch.arange(n * block) % 10 + 3
    return stream.reshape(n, block)


def quick_settings(**overrides) -> TrainSettings:
    base = dict(
        max_steps=6,
        learning_rate=1e-2,
        warmup_steps=0,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=100,
        lr_scheduler_type="constant",
    )
    base.update(overrides)
    return TrainSettings(**base)


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=blocks, labels=blocks).loss.item()


def weights_of(model, masks) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in masks}


# -- masks and the report, by hand ------------------------------------------------------------------------


def test_capture_verify_and_apply_by_hand():
    model = pruned_tiny()
    masks = capture_masks(model)
    name = "model.layers.0.self_attn.q_proj"
    assert set(masks) >= {name, "model.layers.1.mlp.down_proj"} and len(masks) == 14
    assert all(m.float().mean().item() == 0.5 for m in masks.values())  # magnitude 50% per row
    report = verify_sparsity(model, masks)
    assert report.revived == 0 and report.sparsity == pytest.approx(0.5)
    report.raise_if_revived()

    weight = model.get_submodule(name).weight
    row, col = masks[name].nonzero()[0].tolist()
    with torch.no_grad():
        weight[row, col] = 0.25
    report = verify_sparsity(model, masks)
    assert report.revived == 1
    assert [m.name for m in report.matrices if m.revived] == [name]
    with pytest.raises(SparsityLost, match="1 pruned weights .* became non-zero in 1 matrices"):
        report.raise_if_revived()
    apply_masks(model, masks)
    assert weight[row, col].item() == 0.0 and verify_sparsity(model, masks).revived == 0


def test_default_targets_are_the_attention_and_mlp_projections():
    assert default_target_modules(tiny_model("llama")) == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert set(default_target_modules(tiny_model("opt"))) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_training_blocks_cut_the_joined_stream(tmp_path):
    folder = save_tiny(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    source = TextSource("t", ["w1 w2 w3", "w4 w5"], separator=" ")
    blocks = training_blocks(source, tok, 2)
    assert blocks.tolist() == [[4, 5], [6, 7]]  # w1..w4 (ids 3 + i); the remainder w5 is dropped
    assert training_blocks(source, tok, 2, max_blocks=1).tolist() == [[4, 5]]
    with pytest.raises(WandaError, match="fewer than one block"):
        training_blocks(source, tok, 64)


def test_settings_are_validated():
    with pytest.raises(WandaError, match="--lora_r"):
        LoraSettings(lora_r=0)
    with pytest.raises(WandaError, match="--lora_dropout"):
        LoraSettings(lora_dropout=1.0)
    with pytest.raises(WandaError, match="--max_steps"):
        TrainSettings(max_steps=0)
    with pytest.raises(WandaError, match="--per_device_train_batch_size"):
        TrainSettings(per_device_train_batch_size=0)


# -- LoRA -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One short LoRA run on a 50% pruned tiny LLaMA, shared by the LoRA tests."""
    torch.manual_seed(0)
    model = pruned_tiny()
    blocks = patterned_blocks()
    before = lm_loss(model, blocks)
    original = {name: mask.clone() for name, mask in capture_masks(model).items()}
    root = tmp_path_factory.mktemp("lora")
    outcome = finetune(
        model,
        None,
        blocks,
        quick_settings(),
        root / "run",
        mode="lora",
        lora=LoraSettings(lora_r=4, lora_alpha=8, lora_dropout=0.0),
        progress=False,
    )
    # saved and measured now: the merge test below folds the adapter into the base model
    outcome.model.save_pretrained(root / "adapter")
    adapter_ppl = evaluate_perplexity(outcome.model, {"p": blocks[:4]}, progress=False)["p"]
    return outcome, blocks, before, original, root / "adapter", adapter_ppl


def test_a_few_lora_steps_reduce_the_training_loss(lora_run):
    outcome, blocks, before, *_ = lora_run
    after = lm_loss(outcome.model, blocks)
    assert outcome.global_step == 6
    assert after < before - 0.3, (before, after)
    losses = [entry["loss"] for entry in outcome.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # the base weights were frozen: the report covers every pruned matrix and nothing revived
    assert outcome.sparsity.revived == 0 and len(outcome.sparsity.matrices) == 14


def test_masked_merge_keeps_exactly_the_original_zero_pattern(lora_run):
    outcome, blocks, _, original, *_ = lora_run
    base = outcome.model.get_base_model()
    name = "model.layers.0.mlp.up_proj"
    layer = base.get_submodule(name)
    delta = layer.get_delta_weight("default").detach().clone()
    weight = layer.weight.detach().clone()
    assert delta.abs().sum() > 0  # the adapter learned something dense
    # a plain merge would revive pruned weights in every adapted matrix
    revivals = plain_merge_revivals(outcome.model, outcome.masks)
    assert len(revivals) == 14 and all(count > 0 for count in revivals.values())

    merged = masked_merge(outcome.model, outcome.masks)
    assert type(merged).__name__ == "LlamaForCausalLM"
    for key, mask in original.items():
        assert torch.equal(merged.get_submodule(key).weight == 0, mask), key
    # kept weights received the full update; pruned ones none: W' = W + M * dW
    expected = torch.where(original[name], torch.zeros_like(weight), weight + delta)
    assert_close(merged.get_submodule(name).weight, expected)
    assert verify_sparsity(merged, original).revived == 0


def test_adapter_saved_and_reloaded_gives_the_same_perplexity(lora_run, tmp_path):
    _, blocks, _, _, adapter_dir, adapter_ppl = lora_run
    folder = save_tiny(tmp_path)  # the same seed-0 tiny model, pruned here as in the run, with a tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    prune(model, None, PruneSettings(prune_method="magnitude"), progress=False)
    model.save_pretrained(folder)
    loaded = load_with_adapter(str(folder), adapter_dir, device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"  # a causal LM, LoRA layers active inside
    ppl = evaluate_perplexity(loaded.model, {"p": blocks[:4]}, progress=False)["p"]
    assert ppl == pytest.approx(adapter_ppl, rel=1e-5)
    plain = evaluate_perplexity(pruned_tiny(), {"p": blocks[:4]}, progress=False)["p"]
    assert ppl < plain  # the adapter is really applied


# -- mask-keeping full fine-tuning --------------------------------------------------------------------------


def test_full_finetuning_with_adamw_and_weight_decay_keeps_every_zero(tmp_path):
    model = pruned_tiny(sparsity_type="2:4")
    masks = {name: mask.clone() for name, mask in capture_masks(model).items()}
    before = weights_of(model, masks)
    outcome = finetune(
        model,
        None,
        patterned_blocks(),
        quick_settings(weight_decay=0.1, optim="adamw_torch"),
        tmp_path,
        mode="full",
        progress=False,
    )
    after = weights_of(outcome.model, masks)
    for name, mask in masks.items():
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
        assert torch.equal(after[name] == 0, mask), name  # the exact 2:4 pattern, no zero gained or lost
    assert outcome.sparsity.revived == 0 and outcome.sparsity.sparsity == pytest.approx(0.5)


def test_without_the_keeper_the_same_training_revives_pruned_weights(tmp_path):
    """The control: the plain Trainer with AdamW and weight decay does lose the zeros."""
    from transformers import Trainer, default_data_collator

    from wanda.finetune import BlockDataset
    from wanda.finetune.train import training_arguments

    model = pruned_tiny()
    masks = capture_masks(model)
    args = training_arguments(quick_settings(weight_decay=0.1), tmp_path, True, {}, progress=False)
    Trainer(
        model=model, args=args, train_dataset=BlockDataset(patterned_blocks()), data_collator=default_data_collator
    ).train()
    assert verify_sparsity(model, masks).revived > 0

    # the callback alone, on a plain Trainer, is enough to keep them
    model = pruned_tiny()
    masks = capture_masks(model)
    Trainer(
        model=model,
        args=args,
        train_dataset=BlockDataset(patterned_blocks()),
        data_collator=default_data_collator,
        callbacks=[MaskKeepingCallback(masks)],
    ).train()
    assert verify_sparsity(model, masks).revived == 0


def test_resuming_continues_the_step_count_and_keeps_the_zeros(tmp_path):
    blocks = patterned_blocks()
    first = finetune(
        pruned_tiny(), None, blocks, quick_settings(max_steps=3, save_steps=3), tmp_path, mode="full", progress=False
    )
    assert first.global_step == 3 and (tmp_path / "checkpoint-3" / COMPLETE).is_file()
    # a run killed while writing its next checkpoint: a folder without the marker, its optimizer cut short
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / COMPLETE).unlink()
    optimizer = tmp_path / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    checkpoint = resolve_checkpoint(tmp_path, None, overwrite=False)
    assert checkpoint == str(tmp_path / "checkpoint-3")
    second = finetune(
        pruned_tiny(),
        None,
        blocks,
        quick_settings(max_steps=5, save_steps=3),
        tmp_path,
        mode="full",
        resume_from_checkpoint=checkpoint,
        progress=False,
    )
    assert second.global_step == 5
    steps = [entry["step"] for entry in second.log_history if "loss" in entry]
    assert steps[:3] == [1, 2, 3] and steps[-2:] == [4, 5]  # history carried over, then steps 4 and 5
    assert second.sparsity.revived == 0
    # the resumed model equals the one-go run? the data order and optimizer state are restored exactly
    straight = finetune(
        pruned_tiny(),
        None,
        blocks,
        quick_settings(max_steps=5, save_steps=100),
        tmp_path / "b",
        mode="full",
        progress=False,
    )
    for name in second.masks:
        assert_close(second.model.get_submodule(name).weight, straight.model.get_submodule(name).weight, rtol=1e-4)


def test_checkpoint_resolution(tmp_path):
    assert resolve_checkpoint(tmp_path / "missing", None, False) is None
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(WandaError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path, None, False)
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE).write_text("complete\n")
    assert resolve_checkpoint(tmp_path, None, False) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(tmp_path, None, True) is None and not (tmp_path / "checkpoint-10").exists()
    with pytest.raises(WandaError, match="not a Trainer checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path), False)


def test_an_incomplete_newest_checkpoint_is_skipped_with_one_line(tmp_path, caplog):
    for step, complete in ((2, True), (4, True), (6, False), (8, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if complete:
            (folder / COMPLETE).write_text("complete\n")
    with caplog.at_level(logging.INFO, logger="wanda"):
        assert resolve_checkpoint(tmp_path, None, False) == str(tmp_path / "checkpoint-4")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert skipped == [
        "skipping incomplete checkpoints checkpoint-6, checkpoint-8 (written by a run that stopped while saving)"
    ]
    with pytest.raises(WandaError, match="checkpoint-8 is incomplete"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-8"), False)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / COMPLETE).unlink()
    with pytest.raises(WandaError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path, None, False)


def test_checkpoints_are_marked_complete_before_the_old_ones_rotate(tmp_path):
    """save_total_limit 1: each new checkpoint holds its marker, and only then is the previous one removed."""
    seen = []
    from wanda.finetune import checkpoints

    marking = checkpoints.mark_complete

    def spy(folder):
        seen.append(sorted(p.name for p in tmp_path.glob("checkpoint-*")))
        marking(folder)

    checkpoints.mark_complete = spy
    try:
        finetune(
            pruned_tiny(), None, patterned_blocks(), quick_settings(max_steps=4, save_steps=2, save_total_limit=1),
            tmp_path, mode="lora", progress=False,
        )  # fmt: skip
    finally:
        checkpoints.mark_complete = marking
    assert seen == [["checkpoint-2"], ["checkpoint-2", "checkpoint-4"]]
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / COMPLETE).is_file()


# -- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = save_tiny(root)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    prune(model, None, PruneSettings(prune_method="magnitude"), progress=False)
    model.save_pretrained(folder)
    return folder, word_corpus(root / "corpus.txt", words=4000)


def wanda(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``wanda finetune ARGS`` in this process (a subprocess would spend seconds importing torch)."""
    from wanda.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["finetune", *args], "wanda")
    out, err = capsys.readouterr()
    return exited.value.code, out, err


CLI_FLAGS = [
    "--block_size",
    "32",
    "--max_steps",
    "3",
    "--max_eval_samples",
    "4",
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
    "--learning_rate",
    "1e-3",
    "--device",
    "cpu",
]


def test_cli_lora_with_merge_then_eval_with_the_adapter(pruned_folder, tmp_path, capsys, caplog):
    folder, corpus = pruned_folder
    out = tmp_path / "lora"
    code, stdout, err = wanda(
        capsys,
        "lora",
        "--model",
        str(folder),
        "--dataset",
        str(corpus),
        "--output_dir",
        str(out),
        "--merge",
        *CLI_FLAGS,
    )
    assert code == 0, err[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-2").is_dir()
    assert (out / "merged" / "config.json").is_file() and (out / "merged" / "merge_report.json").is_file()
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["global_step"] == 3 and results["merged"]["sparsity"]["revived"] == 0
    assert results["merged"]["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert results["merged"]["plain_merge_revived"] > 0
    assert "| model.layers.1.mlp.down_proj | 64x128 | 0.5000 | 4096 | 0 |" in stdout  # every matrix listed
    adapter_ppl = results["perplexity"]["adapter"]["corpus.txt"]

    code, stdout, err = wanda(
        capsys,
        "eval",
        "--model",
        str(folder),
        "--adapter",
        str(out),
        "--eval_dataset",
        str(corpus),
        "--seqlen",
        "32",
        "--eval_windows",
        "4",
        "--device",
        "cpu",
    )
    assert code == 0, err[-3000:]
    assert f"| corpus.txt | {adapter_ppl:.3f} |" in stdout

    # the top-level evaluation command takes the adapter too; the sparsity it reports is the base model's
    from wanda.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(
            [
                "eval",
                "--model",
                str(folder),
                "--lora_weights",
                str(out),
                "--eval_dataset",
                str(corpus),
                "--ctx_length",
                "32",
                "--eval_windows",
                "4",
                "--device",
                "cpu",
                "--save",
                str(tmp_path / "ev"),
            ],
            "wanda",
        )
    _, err = capsys.readouterr()
    assert exited.value.code == 0, err[-3000:]
    saved = json.loads((tmp_path / "ev" / "results_eval.json").read_text())
    assert saved["perplexity"]["corpus.txt"] == pytest.approx(adapter_ppl, rel=1e-6)
    assert saved["adapter"] == str(out) and saved["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    code, stdout, _ = wanda(
        capsys,
        "eval",
        "--model",
        str(folder),
        "--eval_dataset",
        str(corpus),
        "--seqlen",
        "32",
        "--eval_windows",
        "4",
        "--device",
        "cpu",
    )
    assert code == 0 and f"| corpus.txt | {adapter_ppl:.3f} |" not in stdout  # without it: another model

    # merging the saved adapter later gives the same model as --merge did
    code, stdout, err = wanda(
        capsys,
        "merge",
        "--model",
        str(folder),
        "--adapter",
        str(out),
        "--output",
        str(tmp_path / "merged2"),
        "--device",
        "cpu",
    )
    assert code == 0, err[-3000:]
    assert "0 pruned weights non-zero" in stdout
    from safetensors.torch import load_file

    first, second = (load_file(d / "model.safetensors") for d in (out / "merged", tmp_path / "merged2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    # the same command again resumes from the last checkpoint, which is already at the last step
    with caplog.at_level(logging.INFO):
        code, _, err = wanda(
            capsys, "lora", "--model", str(folder), "--dataset", str(corpus), "--output_dir", str(out), *CLI_FLAGS
        )
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoint-3'}" in caplog.text


def test_cli_full_finetuning(pruned_folder, tmp_path, capsys):
    folder, corpus = pruned_folder
    out = tmp_path / "full"
    code, stdout, err = wanda(
        capsys,
        "full",
        "--model",
        str(folder),
        "--dataset",
        str(corpus),
        "--output_dir",
        str(out),
        "--weight_decay",
        "0.1",
        *CLI_FLAGS,
    )
    assert code == 0, err[-3000:]
    assert (out / "model.safetensors").is_file()
    results = json.loads((out / "finetune_results.json").read_text())
    assert results["sparsity"]["revived"] == 0 and results["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert "fine-tuned ppl" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora", "--model", "MODEL", "--output_dir", "OUT", "--lora_r", "0"], "--lora_r must be at least 1"),
        (["lora", "--model", "MODEL", "--output_dir", "OUT", "--dataset", "nowhere.txt"], "neither a file/folder"),
        (["full", "--model", "MODEL", "--output_dir", "OUT", "--dtype", "float16"], "float32 or bfloat16"),
        (["full", "--model", "MODEL", "--output_dir", "OUT", "--optim", "bogus"], "invalid training setting: bogus"),
        (["eval", "--model", "MODEL", "--adapter", "OUT"], "not a LoRA adapter folder"),
        (["lora", "--model", "MODEL", "--output_dir", "OUT", "--bogus"], "unrecognized arguments"),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(pruned_folder, tmp_path, capsys, args, message):
    folder, _ = pruned_folder
    args = [{"MODEL": str(folder), "OUT": str(tmp_path)}.get(a, a) for a in args]
    code, _, err = wanda(capsys, *args)
    assert code == 2, err[-2000:]
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_second_run_on_the_same_output_dir_is_refused(pruned_folder, tmp_path, capsys):
    """Two runs on one ``--output_dir`` would interleave their checkpoints: while one holds the folder's lock
    (``.OUT.lock`` beside it, an flock held for the whole run), the other stops before loading anything."""
    import fcntl

    folder, corpus = pruned_folder
    out = tmp_path / "lora"
    with open(tmp_path / ".lora.lock", "a+") as held:  # the other run, holding the lock as claim() does
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = ("lora", "--model", str(folder), "--dataset", str(corpus), "--output_dir", str(out), *CLI_FLAGS)
        code, _, err = wanda(capsys, *args)
    assert code == 2, err[-2000:]
    assert "another run is writing" in err and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert not any(out.glob("checkpoint-*")) and not (out / "finetune_results.json").exists()
