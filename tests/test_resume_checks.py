"""What a resumed streamed run trusts, and what a streamed run leaves when its save fails: every file of the work
folder is verified or refused in one line (its fingerprint included), every input file that the result depends
on is part of the fingerprint, and a save that a full disk refuses keeps the pruned blocks, says where, and lets
the same command finish; the variant's cap holds streamed as in memory; generated shard indexes are one line
through the command line in every mode."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import calib_ids, save_tiny, tiny_model, word_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_checkpoint_reader import MODES, _argv, _json, _prune, _sharded, _stopped_run
from test_outputs_vs_inputs import tree_hash

from wanda.cli.main import main
from wanda.errors import WandaError


@pytest.fixture
def four_blocks(tmp_path) -> Path:
    folder = save_tiny(tmp_path, "llama")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
    return folder


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"model": ', "Expecting value"),
        (b"[1, 2]", "it holds a JSON list, not an object"),
        (b"\xff\xfe{}", "can't decode byte 0xff"),
    ],
    ids=["truncated", "a list", "not UTF-8"],
)
def test_a_damaged_fingerprint_is_one_line_and_the_folder_stays(four_blocks, tmp_path, content, reason):
    """The fingerprint says whose blocks these are: unreadable, the folder is neither adopted nor emptied."""
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    (work / "fingerprint.json").write_bytes(content)
    before = _listing(work)
    with pytest.raises(WandaError) as info:
        _prune(four_blocks, work)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"work folder {work} cannot be resumed: its fingerprint.json")
    assert reason in message, message
    assert _listing(work) == before


@pytest.mark.parametrize("edit", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_an_edited_tokenizer_or_generation_file_is_another_run(four_blocks, tmp_path, edit):
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    path = four_blocks / edit
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))  # the same JSON, other bytes
    with pytest.raises(WandaError, match=r"belongs to another run \(differs in files\)"):
        _prune(four_blocks, work)


def test_edited_tensors_outside_the_blocks_are_another_run(four_blocks, tmp_path):
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    weights = four_blocks / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][3, 1] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WandaError, match=r"belongs to another run \(differs in outside\)"):
        _prune(four_blocks, work)


@pytest.mark.parametrize("cut", ["half", "header only", "empty"])
def test_a_truncated_work_folder_file_is_redone(four_blocks, tmp_path, caplog, cut):
    straight = _prune(four_blocks, tmp_path / "straight")
    expected = straight.checkpoint.read(straight.checkpoint.names())
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    block = work / "block-00001.safetensors"
    data = block.read_bytes()
    keep = {"half": len(data) // 2, "header only": 8 + int.from_bytes(data[:8], "little"), "empty": 0}[cut]
    block.write_bytes(data[:keep])
    run = _prune(four_blocks, work)
    assert any("block-00001" in r.getMessage() and "does not verify" in r.getMessage() for r in caplog.records)
    got = run.checkpoint.read(run.checkpoint.names())
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_streamed_save_on_a_full_disk_keeps_the_blocks_and_the_same_command_finishes(four_blocks, tmp_path, capsys):
    """The save fails after every block was pruned: one line naming the work folder that stays (and nothing at
    the target); the same command in the same process then resumes past every block, saves, and removes it."""
    import wanda.export.shards as shards

    text = word_corpus(tmp_path / "w.txt", words=2000)
    target, before = tmp_path / "out" / "pruned", tree_hash(four_blocks)
    argv = [
        *_argv(four_blocks, text, "disk"),
        "--prune_method",
        "wanda",
        "--nsamples",
        "4",
        "--save_model",
        str(target),
    ]
    original = shards.write_safetensors

    def full(path, *args, **kwargs):
        if ".work" not in str(path):  # the saved model's shard; the work folder's blocks are written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(shards, "write_safetensors", full)
        with pytest.raises(SystemExit) as info:
            main(argv, "wanda")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if re.match(r"wanda: error: ", line)]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    work = target.with_name("pruned.work")
    assert f"could not write {target}: no space left on device" in errors[0]
    assert f"the pruned blocks stay in {work}" in errors[0], errors[0]
    assert sorted(p.name for p in target.parent.iterdir()) == ["pruned.work"]
    assert sorted(p.name for p in work.glob("block-*")) == [f"block-{i:05d}.safetensors" for i in range(4)]
    assert tree_hash(four_blocks) == before

    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    assert info.value.code == 0, capsys.readouterr().err
    assert sorted(p.name for p in target.parent.iterdir()) == ["pruned"]
    got = load_file(target / "model.safetensors")
    straight = tmp_path / "straight"
    with pytest.raises(SystemExit) as info:
        main([*argv[:-1], str(straight)], "wanda")
    assert info.value.code == 0
    want = load_file(straight / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_variant_at_0995_keeps_a_weight_in_every_row_streamed(tmp_path):
    """The cap of ``test_methods.py::test_wanda_variant_at_0995_keeps_a_weight_in_every_row``, on the streamed
    path: the same bits as in memory, and no row of any block matrix empty."""
    from wanda import prune
    from wanda.engine.streaming import StreamSettings
    from wanda.models import load_model
    from wanda.pruning.prune_settings import PruneSettings
    from wanda.pruning.streamed import prune_streamed

    folder = save_tiny(tmp_path / "model", "llama")
    ids = calib_ids(4, 16)
    chosen = PruneSettings(prune_method="wanda", use_variant=True, sparsity_ratio=0.995)
    model = load_model(str(folder), dtype="float32", device="cpu").model
    prune(model, ids, chosen, device="cpu", progress=False, batch_size=2)
    memory = model.state_dict()
    run = prune_streamed(folder, ids, chosen, StreamSettings(offload="disk", work_dir=str(tmp_path / "w")),
                         batch_size=2, progress=False, cleanup=False)  # fmt: skip
    streamed = run.checkpoint.read([n for n in run.checkpoint.names() if ".layers." in n])
    run.cleanup()
    matrices = {n: t for n, t in streamed.items() if t.dim() == 2}
    assert len(matrices) == 2 * 7
    for name, weight in matrices.items():
        assert torch.equal(weight, memory[name]), name
        assert bool((weight != 0).any(dim=1).all()), f"{name}: a row was emptied"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("index-base"), "llama")


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=_json | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=6), _json, max_size=3)}))
def test_generated_shard_indexes_through_the_command_line(tiny, tmp_path_factory, mode, index):
    """The command-line side of ``test_checkpoint_reader.py::test_generated_shard_indexes_are_read_or_refused_in_
    one_line``: whatever the index holds, exit 2, one error line last, the model folder unchanged."""
    model = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("gen-index") / "model"))
    _sharded(model)
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    text = word_corpus(model.parent / "w.txt", words=500)
    err, before = io.StringIO(), tree_hash(model)
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(_argv(model, text, mode), "wanda")
    assert info.value.code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
    assert err.getvalue().strip().splitlines()[-1].startswith("wanda: error: ")
    assert tree_hash(model) == before


# the same through the command line ----------------------------------------------------------------------------


def _interrupted_cli_run(argv: list[str], capsys) -> None:
    """``argv`` stopped by Ctrl-C once block 1 is saved (exit 130), as a user stopping a streamed run would."""
    from wanda.engine.resume import WorkFolder

    original = WorkFolder.save_hidden

    def stopping(self, index, hidden):
        original(self, index, hidden)
        if index == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(WorkFolder, "save_hidden", stopping)
        with pytest.raises(SystemExit) as info:
            main(argv, "wanda")
    assert info.value.code == 130, capsys.readouterr().err
    capsys.readouterr()


def _one_error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if re.match(r"wanda: error: ", line)]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("edit", ["weights", "config"])
def test_an_edited_checkpoint_is_never_resumed_through_the_command_line(four_blocks, tmp_path, capsys, edit):
    text = word_corpus(tmp_path / "w.txt", words=2000)
    work, target = tmp_path / "work", tmp_path / "pruned"
    argv = [*_argv(four_blocks, text, "disk"), "--prune_method", "wanda", "--nsamples", "4",
            "--work_dir", str(work), "--save_model", str(target)]  # fmt: skip
    _interrupted_cli_run(argv, capsys)
    done = _listing(work)
    assert {"block-00000.safetensors", "block-00001.safetensors"} <= set(done)
    if edit == "weights":  # other bytes, the same shapes and file size
        weights = four_blocks / "model.safetensors"
        tensors = load_file(weights)
        tensors["model.layers.1.self_attn.o_proj.weight"] *= -1
        save_file(tensors, weights, metadata={"format": "pt"})
        expected = "the checkpoint changed since work folder"
    else:
        config = json.loads((four_blocks / "config.json").read_text())
        (four_blocks / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))
        expected = "belongs to another run (differs in files)"
    assert expected in _one_error_line(argv, capsys)
    assert _listing(work) == done and not target.exists()  # nothing mixed, nothing saved


def test_a_second_run_on_a_busy_work_folder_is_one_line(four_blocks, tmp_path, capsys):
    """Another process holds the work folder's lock (as a running streamed run does): refused, nothing
    touched in it."""
    import fcntl

    text = word_corpus(tmp_path / "w.txt", words=2000)
    work = tmp_path / "work"
    argv = [*_argv(four_blocks, text, "disk"), "--prune_method", "wanda", "--nsamples", "4", "--work_dir", str(work)]
    _interrupted_cli_run(argv, capsys)
    done = _listing(work)
    with open(work / ".lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert f"another run is using work folder {work}" in _one_error_line(argv, capsys)
    assert _listing(work) == done


def test_a_work_folder_locked_by_another_process_is_one_line(four_blocks, tmp_path, capsys):
    """The same with the lock held by a real second process (``flock`` is per open file description, so the
    test above already has another holder; this one leaves no doubt), and the folder is usable once it exits."""
    import subprocess
    import sys

    text = word_corpus(tmp_path / "w.txt", words=2000)
    work = tmp_path / "work"
    argv = [*_argv(four_blocks, text, "disk"), "--prune_method", "wanda", "--nsamples", "4", "--work_dir", str(work)]
    _interrupted_cli_run(argv, capsys)
    done = _listing(work)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f.fileno(), fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(600)",
            str(work / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"another run is using work folder {work}" in _one_error_line(argv, capsys)
        assert _listing(work) == done
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(SystemExit) as info:  # the lock died with its holder: the run resumes and finishes
        main(argv, "wanda")
    assert info.value.code == 0, capsys.readouterr().err
