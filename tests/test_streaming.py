"""Streaming: blocks materialised from the checkpoint one at a time, saved as they finish, a killed run resumed.

The streamed path must give the in-memory path's bits (same walk, same block computations), so results are
compared with ``torch.equal``; perplexity within 1e-4 relative.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import calib_ids, save_tiny, tiny_model, word_corpus
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from wanda import PruneSettings, WandaError, perplexity, prune
from wanda.engine.streaming import StreamSettings, choose_streaming
from wanda.eval.streamed import streamed_perplexity
from wanda.export import save_model
from wanda.models import load_model
from wanda.models.checkpoint import INDEX_NAME
from wanda.models.streaming import build_skeleton
from wanda.pruning.streamed import open_pruned, prune_streamed, save_streamed, streamed_linear_sparsity

ENTRY = Path(__file__).with_name("streaming_entry.py")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def _in_memory(folder: Path, settings: PruneSettings, target: Path, ids: torch.Tensor) -> None:
    model = load_model(str(folder), dtype="float32", device="cpu").model
    prune(model, ids, settings, device="cpu", progress=False, batch_size=2)
    save_model(model, None, target)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt", "admm", "alps"])
def test_streamed_prune_and_save_equal_in_memory(tmp_path, arch, method):
    folder = save_tiny(tmp_path, arch)
    settings = PruneSettings(prune_method=method, sparsity_ratio=0.5)
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
    assert not run.work.path.exists()  # removed on success
    assert run.report.actual_sparsity == pytest.approx(0.5, rel=1e-9)
    memory, streamed = _state(tmp_path / "memory"), _state(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        if method in ("sparsegpt", "admm", "alps"):  # the same masks; the weights are the same bits as well
            assert torch.equal(tensor == 0, streamed[name] == 0), name
        assert torch.equal(tensor, streamed[name]), name
    assert (tmp_path / "streamed" / "tokenizer.json").is_file()


def test_streamed_save_in_shards_with_index(tmp_path):
    folder = save_tiny(tmp_path, "llama")
    settings = PruneSettings(prune_method="wanda")
    run = prune_streamed(
        folder,
        calib_ids(),
        settings,
        StreamSettings(offload="disk", work_dir=str(tmp_path / "w")),
        batch_size=2,
        progress=False,
    )
    save_streamed(run.streamed, run.checkpoint, tmp_path / "sharded", max_shard_size=100_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / INDEX_NAME).is_file()
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    save_streamed(run.streamed, run.checkpoint, tmp_path / "single")
    run.cleanup()
    single, sharded = _state(tmp_path / "single"), _state(tmp_path / "sharded")
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_streamed_perplexity_equals_in_memory(tmp_path, arch):
    folder = save_tiny(tmp_path, arch)
    windows = calib_ids(6, 32, seed=3)
    model = load_model(str(folder), dtype="float32", device="cpu").model
    expected = perplexity(model, windows, batch_size=2, progress=False)
    got = streamed_perplexity(build_skeleton(folder, torch.float32), windows, "cpu", batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-4)
    offloaded = streamed_perplexity(
        build_skeleton(folder, torch.float32),
        windows,
        "cpu",
        batch_size=2,
        activations=tmp_path / "act",
        progress=False,
    )
    assert offloaded == pytest.approx(expected, rel=1e-4)
    assert not any((tmp_path / "act").iterdir())  # the activation file is removed afterwards


def test_streamed_perplexity_of_the_pruned_run(tmp_path):
    """Evaluating straight from the work folder (no saved model) equals evaluating the in-memory pruned model."""
    folder = save_tiny(tmp_path, "qwen2")
    settings, ids, windows = PruneSettings(prune_method="wanda"), calib_ids(), calib_ids(4, 32, seed=5)
    model = load_model(str(folder), dtype="float32", device="cpu").model
    prune(model, ids, settings, device="cpu", progress=False, batch_size=2)
    run = prune_streamed(
        folder,
        ids,
        settings,
        StreamSettings(offload="disk", work_dir=str(tmp_path / "w")),
        batch_size=2,
        progress=False,
    )
    pruned = open_pruned(run)
    got = streamed_perplexity(pruned, windows, "cpu", batch_size=2, progress=False)
    assert streamed_linear_sparsity(pruned) == pytest.approx(0.5, rel=1e-9)
    run.cleanup()
    assert got == pytest.approx(perplexity(model, windows, batch_size=2, progress=False), rel=1e-4)


def test_activations_offloaded_to_a_file_give_the_same_model(tmp_path):
    folder = save_tiny(tmp_path, "mistral")
    settings = PruneSettings(prune_method="wanda")
    prune_streamed(
        folder,
        calib_ids(),
        settings,
        StreamSettings(offload="disk"),
        save_model=tmp_path / "ram",
        batch_size=2,
        progress=False,
    )
    prune_streamed(
        folder,
        calib_ids(),
        settings,
        StreamSettings(offload="disk", offload_activations=str(tmp_path / "act")),
        save_model=tmp_path / "file",
        batch_size=2,
        progress=False,
    )
    ram, file = _state(tmp_path / "ram"), _state(tmp_path / "file")
    assert all(torch.equal(ram[k], file[k]) for k in ram)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("activations", [False, True])
def test_streamed_owl_equals_in_memory(tmp_path, method, activations):
    """OWL's dense walk runs before the pruning walk: it must leave the embeddings for the pruning walk's
    capture, score each block while it is loaded, and keep its activations where streaming keeps them."""
    folder = save_tiny(tmp_path, "llama")
    settings = PruneSettings(prune_method=method, sparsity_ratio=0.5, sparsity_profile="owl", owl_lambda=0.08)
    ids = calib_ids()
    _in_memory(folder, settings, tmp_path / "memory", ids)
    stream = StreamSettings(offload="disk", offload_activations=str(tmp_path / "act") if activations else None)
    run = prune_streamed(folder, ids, settings, stream, save_model=tmp_path / "streamed", batch_size=2, progress=False)
    assert run.report.profile_seconds > 0
    assert {l.ratio for l in run.report.layers} != {0.5}  # OWL gave the blocks their own ratios
    memory, streamed = _state(tmp_path / "memory"), _state(tmp_path / "streamed")
    assert memory.keys() == streamed.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, streamed[name]), name
    if activations:
        assert not any((tmp_path / "act").glob("*.bin"))  # every activation file removed


def _four_block_model(tmp_path: Path) -> Path:
    """The tiny LLaMA with 4 blocks and the tiny word tokenizer, so a run can be killed in its middle."""
    folder = save_tiny(tmp_path, "llama")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
    return folder


def _cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **extra}


def _cli_args(
    folder: Path, corpus: Path, save_model: Path, *more: str, offload: str = "disk", evaluate: bool = False
) -> list[str]:
    evaluation = (
        ["--eval_dataset", str(corpus), "--eval_windows", "4", "--eval_dense"]
        if evaluate
        else ["--eval_dataset", "none"]
    )
    return [
        sys.executable,
        str(ENTRY),
        "--model",
        str(folder),
        "--calib_dataset",
        str(corpus),
        *evaluation,
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "--device",
        "cpu",
        "--offload",
        offload,
        "--save_model",
        str(save_model),
        *more,
    ]


def _start_and_kill(args: list[str], stall: str) -> None:
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=_cli_env(WANDA_TEST_STALL=stall))
    deadline, line = time.monotonic() + 240, ""
    while "stalled" not in line:
        line = proc.stderr.readline()
        assert (line or proc.poll() is None) and time.monotonic() < deadline, "the run ended before it stalled"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stall", ["save_hidden:2", "save_block:2"])
def test_wanda_killed_with_sigkill_resumes_bit_identical(tmp_path, stall):
    """``save_hidden:2``: block 1 and its outputs are saved, so the restart resumes at block 2;
    ``save_block:2``: block 2 is saved but not its outputs, so block 2 is done again."""
    folder, corpus = _four_block_model(tmp_path), word_corpus(tmp_path / "corpus.txt", words=2000)
    work = tmp_path / "resumed.work"  # the default: beside --save_model
    _start_and_kill(_cli_args(folder, corpus, tmp_path / "resumed"), stall)
    assert not (tmp_path / "resumed").exists() and (work / "fingerprint.json").is_file()

    again = subprocess.run(
        _cli_args(folder, corpus, tmp_path / "resumed", "--save", str(tmp_path / "resumed_results")),
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stderr.splitlines() if "resuming from block" in line] == [
        f"INFO wanda.engine.streaming: resuming from block 2 of 4 (work folder {work})"
    ]
    assert not work.exists()

    straight = subprocess.run(
        _cli_args(folder, corpus, tmp_path / "straight", "--save", str(tmp_path / "straight_results")),
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=300,
    )
    assert straight.returncode == 0 and "resuming" not in straight.stderr
    # the resumed run's report holds every block, the ones done before the kill included, as the straight run's
    reports = [
        json.loads((tmp_path / f"{run}_results" / "results_wanda.json").read_text())["prune"]
        for run in ("resumed", "straight")
    ]
    kept = ("name", "shape", "sparsity", "ratio", "tokens")
    resumed_rows, straight_rows = ([{k: row[k] for k in kept} for row in r["layers"]] for r in reports)
    assert resumed_rows == straight_rows and len(straight_rows) == 4 * 7
    assert reports[0]["actual_sparsity"] == reports[1]["actual_sparsity"]
    shards = sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "resumed").glob("*.safetensors")) == ["model.safetensors"]
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == (
        tmp_path / "resumed" / "model.safetensors"
    ).read_bytes()
    with safe_open(str(tmp_path / "resumed" / "model.safetensors"), "pt") as handle:
        weight = handle.get_tensor("model.layers.3.mlp.down_proj.weight")
    assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()  # Wanda's exact per-row 50%


def test_mismatched_work_folder_is_refused_with_exit_2(tmp_path):
    folder, corpus = _four_block_model(tmp_path), word_corpus(tmp_path / "corpus.txt", words=2000)
    work = tmp_path / "out.work"
    _start_and_kill(_cli_args(folder, corpus, tmp_path / "out"), "save_hidden:1")
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    for change, differs in ((["--sparsity_ratio", "0.6"], "settings"), (["--seed", "1"], "calibration, seed")):
        other = subprocess.run(
            _cli_args(folder, corpus, tmp_path / "out", *change),
            capture_output=True,
            text=True,
            env=_cli_env(),
            timeout=300,
        )
        assert other.returncode == 2, other.stderr[-2000:]
        last = other.stderr.strip().splitlines()[-1]
        assert last.startswith(f"wanda: error: work folder {work} belongs to another run (differs in {differs})")
        assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # nothing of the earlier run is lost
    with pytest.raises(WandaError, match="differs in calibration"):  # the same through the Python API
        prune_streamed(
            folder,
            calib_ids(8, 32, seed=1),
            PruneSettings(prune_method="wanda"),
            StreamSettings(offload="disk", work_dir=str(work)),
            batch_size=2,
            progress=False,
            seed=0,
        )


def test_wanda_streamed_equals_in_memory_through_the_cli(tmp_path):
    """``wanda --offload disk`` and ``--offload none``: the same saved bits and the same perplexities; and
    ``wanda eval --offload disk`` evaluates the saved model block by block to the same perplexity."""
    # (OPT: tied head; the tiny word tokenizer reads as a Qwen2 tokenizer in a Qwen2 folder, which drops its words)
    folder, corpus = save_tiny(tmp_path, "opt"), word_corpus(tmp_path / "corpus.txt", words=2000)
    results = {}
    for mode in ("disk", "none"):
        args = _cli_args(
            folder, corpus, tmp_path / mode, "--save", str(tmp_path / f"res-{mode}"), offload=mode, evaluate=True
        )
        proc = subprocess.run(args, capture_output=True, text=True, env=_cli_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("(streamed)" in proc.stdout) == (mode == "disk")
        results[mode] = json.loads((tmp_path / f"res-{mode}" / "results_wanda.json").read_text())
    disk, none = _state(tmp_path / "disk"), _state(tmp_path / "none")
    assert all(torch.equal(disk[k], none[k]) for k in none)
    for state in ("dense", "pruned"):
        for name, value in results["none"]["perplexity"][state].items():
            assert results["disk"]["perplexity"][state][name] == pytest.approx(value, rel=1e-4)
    assert results["disk"]["prune"]["actual_sparsity"] == results["none"]["prune"]["actual_sparsity"] == 0.5
    evals = {}
    for mode in ("disk", "none"):
        proc = subprocess.run(
            [
                sys.executable,
                str(ENTRY),
                "eval",
                "--model",
                str(tmp_path / "none"),
                "--eval_dataset",
                str(corpus),
                "--eval_windows",
                "4",
                "--seqlen",
                "32",
                "--device",
                "cpu",
                "--offload",
                mode,
                "--save",
                str(tmp_path / f"eval-{mode}"),
            ],
            capture_output=True,
            text=True,
            env=_cli_env(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        evals[mode] = json.loads((tmp_path / f"eval-{mode}" / "results_eval.json").read_text())
    assert evals["disk"]["linear_sparsity"] == pytest.approx(evals["none"]["linear_sparsity"], rel=1e-12)
    for name, value in evals["none"]["perplexity"].items():
        assert evals["disk"]["perplexity"][name] == pytest.approx(value, rel=1e-4)
        assert value == pytest.approx(results["none"]["perplexity"]["pruned"][name], rel=1e-4)


def test_stream_settings_are_validated():
    with pytest.raises(WandaError, match="--offload must be one of auto, none, disk"):
        StreamSettings(offload="gpu")
    with pytest.raises(WandaError, match="--memory_fraction"):
        StreamSettings(memory_fraction=0)


def test_automatic_choice_says_so_in_one_line(monkeypatch, caplog):
    import wanda.engine.streaming as streaming

    monkeypatch.setattr(streaming, "available_memory", lambda device: 10_000)
    with caplog.at_level(logging.INFO, logger="wanda.engine.streaming"):
        assert choose_streaming(StreamSettings(), 8_000, torch.device("cpu"))  # 8 kB > 70% of 10 kB
        assert not choose_streaming(StreamSettings(), 6_000, torch.device("cpu"))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "streaming the decoder blocks from disk",
        "loading the whole model",
    ]
    assert choose_streaming(StreamSettings(offload="disk"), 1, torch.device("cpu"))
    assert not choose_streaming(StreamSettings(offload="none"), 10**15, torch.device("cpu"))


def test_non_safetensors_folder_is_refused(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(WandaError, match="no safetensors weights"):
        build_skeleton(folder, torch.float32)


@pytest.mark.parametrize("arch", ["opt", "llama"])  # OPT ties its LM head to the embeddings: an alias
def test_streamed_compressed_save_equals_in_memory(tmp_path, arch):
    from wanda.models.compressed import load_compressed_state_dict, same_bits

    folder = save_tiny(tmp_path, arch)
    settings, ids = PruneSettings(prune_method="wanda", sparsity_type="2:4"), calib_ids()
    model = load_model(str(folder), dtype="float32", device="cpu").model
    prune(model, ids, settings, device="cpu", progress=False, batch_size=2)
    save_model(model, None, tmp_path / "memory", save_format="compressed")
    run = prune_streamed(
        folder,
        ids,
        settings,
        StreamSettings(offload="disk"),
        save_model=tmp_path / "streamed",
        batch_size=2,
        progress=False,
        save_format="compressed",
    )
    assert (
        run.saved.compression.encodings[
            "model.layers.0.mlp.up_proj.weight" if arch == "llama" else "model.decoder.layers.0.fc1.weight"
        ]
        == "bitmask"
    )
    memory, m_manifest = load_compressed_state_dict(tmp_path / "memory")
    streamed, s_manifest = load_compressed_state_dict(tmp_path / "streamed")
    assert m_manifest == s_manifest
    assert memory.keys() == streamed.keys() and all(same_bits(memory[k], streamed[k]) for k in memory)
    loaded = load_model(str(tmp_path / "streamed"), dtype="float32", device="cpu").model  # as every command reads it
    assert torch.equal(loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_streaming_folder_follows_offload_and_format(tmp_path, monkeypatch):
    import wanda.engine.streaming as streaming
    from wanda.pruning.handle import streaming_folder

    folder = save_tiny(tmp_path, "llama")
    cpu = torch.device("cpu")
    assert streaming_folder(str(folder), None, cpu, torch.float32, StreamSettings(offload="disk")) == folder
    assert streaming_folder(str(folder), None, cpu, torch.float32, StreamSettings(offload="none")) is None
    assert streaming_folder(str(folder), None, cpu, torch.float32, StreamSettings()) is None  # fits easily
    monkeypatch.setattr(streaming, "available_memory", lambda device: 1000)
    assert streaming_folder(str(folder), None, cpu, torch.float32, StreamSettings()) == folder
    pickled = tmp_path / "pickled"  # weights as a pickled .bin: the in-memory path
    model = tiny_model("llama")
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert streaming_folder(str(pickled), None, cpu, torch.float32, StreamSettings(offload="disk")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activations", [False, True])
def test_streamed_on_the_last_cuda_device(tmp_path, activations):
    """The blocks, activations and results live on ``cuda:N`` as asked (not cuda:0), and prune as on the CPU
    (exact per-row sparsity for Wanda); the streamed perplexity on the GPU matches the CPU's."""
    device = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    folder = save_tiny(tmp_path, "llama")
    stream = StreamSettings(offload="disk", offload_activations=str(tmp_path / "act") if activations else None)
    run = prune_streamed(
        folder,
        calib_ids(),
        PruneSettings(prune_method="wanda"),
        stream,
        save_model=tmp_path / "gpu",
        device=device,
        batch_size=2,
        progress=False,
    )
    assert run.report.actual_sparsity == pytest.approx(0.5, rel=1e-9)
    state = _state(tmp_path / "gpu")
    weight = state["model.layers.1.mlp.down_proj.weight"]
    assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()
    windows = calib_ids(4, 32, seed=2)
    cpu = streamed_perplexity(build_skeleton(tmp_path / "gpu", torch.float32), windows, "cpu", 2, progress=False)
    gpu = streamed_perplexity(
        build_skeleton(tmp_path / "gpu", torch.float32, device), windows, device, 2, progress=False
    )
    assert gpu == pytest.approx(cpu, rel=1e-3)  # TF32/fused kernels differ from the CPU's in the last bits


def test_streamed_in_bfloat16_equals_in_memory(tmp_path):
    """An fp32 checkpoint run in bf16: every tensor cast as from_pretrained(dtype=bf16) casts it, same result."""
    folder = save_tiny(tmp_path, "mistral")
    settings, ids = PruneSettings(prune_method="wanda"), calib_ids()
    model = load_model(str(folder), dtype="bfloat16", device="cpu").model
    prune(model, ids, settings, device="cpu", progress=False, batch_size=2)
    save_model(model, None, tmp_path / "memory")
    prune_streamed(
        folder,
        ids,
        settings,
        StreamSettings(offload="disk"),
        save_model=tmp_path / "streamed",
        dtype=torch.bfloat16,
        batch_size=2,
        progress=False,
    )
    memory, streamed = (
        AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype="auto").state_dict()
        for name in ("memory", "streamed")
    )
    assert {t.dtype for t in streamed.values()} == {torch.bfloat16}
    assert all(torch.equal(memory[k], streamed[k]) and memory[k].dtype == streamed[k].dtype for k in memory)
