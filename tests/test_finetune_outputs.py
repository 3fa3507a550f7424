"""The final save of ``wanda finetune`` is whole or absent: a disk that fills while the trained adapter is saved
is one line and leaves ``--output_dir`` with its checkpoints and nothing half-written; the same command then
resumes and saves; a temporary folder left by a killed save is removed by the next run."""

from __future__ import annotations

import errno
import json
import logging
import os
import re

import pytest
from test_finetune import CLI_FLAGS, pruned_folder, wanda  # noqa: F401 - the fixture

from wanda.finetune.checkpoints import COMPLETE, resolve_checkpoint


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_the_checkpoints(
    pruned_folder,  # noqa: F811
    tmp_path,
    capsys,
    caplog,
):
    from transformers import Trainer

    folder, corpus = pruned_folder
    out = tmp_path / "lora"
    args = ("lora", "--model", str(folder), "--dataset", str(corpus), "--output_dir", str(out), *CLI_FLAGS)
    original = Trainer.save_model

    def full(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        if ".final." in str(output_dir):  # the final save, written in part, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir))

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Trainer, "save_model", full)
        code, _, err = wanda(capsys, *args)
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"could not write {out}: no space left on device (saving the final weights)" in errors[0], errors[0]
    # the checkpoints stay, complete; nothing of the final save is there
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert all((out / name / COMPLETE).is_file() for name in ("checkpoint-2", "checkpoint-3"))

    with caplog.at_level(logging.INFO):
        code, _, err = wanda(capsys, *args)
    assert code == 0, err[-2000:]
    assert any("resuming from" in r.getMessage() and "checkpoint-3" in r.getMessage() for r in caplog.records)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "finetune_results.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".final.")]


def test_a_final_save_left_by_a_killed_run_is_removed(tmp_path, caplog):
    """Only the temporary name is taken for a leftover: the folder is then empty and a fresh run may start."""
    from wanda.errors import WandaError

    out = tmp_path / "out"
    left = out / ".final.abcd_123.tmp"
    left.mkdir(parents=True)
    (left / "adapter_model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(out, None, overwrite=False) is None
    assert not left.exists()
    assert any("killed while saving its final weights" in r.getMessage() for r in caplog.records)
    kept = out / ".final.notours"
    kept.mkdir()
    with pytest.raises(WandaError, match="is not empty and holds no complete checkpoint"):
        resolve_checkpoint(out, None, overwrite=False)
    assert kept.is_dir()


@pytest.mark.parametrize("command", ["lora --merge", "merge"])
def test_a_merged_model_too_big_for_the_disk_refuses_before_any_work(
    pruned_folder,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
    command,
):
    """``finetune lora --merge`` and ``finetune merge`` size the merged model from the loaded base before
    training or merging: too little space is one line, and nothing is written."""
    import shutil
    from collections import namedtuple

    import wanda.finetune as finetune_package
    from wanda.models import load_model
    from wanda.utils.space import format_bytes, weights_bytes

    folder, corpus = pruned_folder
    merged = tmp_path / "merged"
    if command == "merge":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(folder)}))
        args = ("merge", "--model", str(folder), "--adapter", str(adapter), "--output", str(merged))
        monkeypatch.setattr(finetune_package, "load_adapter", _never)
    else:
        args = ("lora", "--model", str(folder), "--dataset", str(corpus), "--output_dir", str(tmp_path / "lora"),
                "--merge", str(merged), *CLI_FLAGS)  # fmt: skip
        monkeypatch.setattr(finetune_package, "finetune", _never)
    usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 999, 999))
    code, _, err = wanda(capsys, *args)
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    need = format_bytes(weights_bytes(load_model(str(folder), device="cpu").model))
    assert f"not enough space in {merged}: needs {need} (the merged model {need}), 999 B free" in errors[0]
    assert not merged.exists() and not (tmp_path / "lora" / "finetune_results.json").exists()


def _never(*args, **kwargs):
    raise AssertionError("the run went past the space check")
