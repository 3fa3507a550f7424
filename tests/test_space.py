"""Full and read-only disks: the activation file is allocated before it is mapped, and work-folder writes that
the file system refuses are one line; a refused run leaves no work folder it made."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

from wanda.engine import resume
from wanda.engine.activations import ActivationFile
from wanda.engine.resume import WorkFolder
from wanda.errors import WandaError
from wanda.utils import space

Usage = namedtuple("Usage", "total used free")


def _hidden() -> list[torch.Tensor]:
    return [torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + i for i in range(3)]


def test_activation_file_refused_when_free_space_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(WandaError, match=r"not enough space for the activation file .*: needs 288 B, 100 B free"):
        ActivationFile(tmp_path / "acts" / "a.bin", _hidden(), torch.device("cpu"))
    assert not (tmp_path / "acts" / "a.bin").exists()


def test_activation_file_enospc_at_allocation_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(WandaError, match=r"not enough space for the activation file .*: needs 288 B"):
        ActivationFile(tmp_path / "a.bin", _hidden(), torch.device("cpu"))
    assert not (tmp_path / "a.bin").exists()


def test_activation_file_fallback_writes_zeros_and_keeps_the_values(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    hidden = _hidden()
    expected = [h.clone() for h in hidden]
    store = ActivationFile(tmp_path / "a.bin", hidden, torch.device("cpu"))
    assert (tmp_path / "a.bin").stat().st_size == 288
    assert all(torch.equal(store[i], expected[i]) for i in range(3))
    store.close()
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize(
    "code, words", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")]
)
def test_a_refused_block_write_is_one_line_and_keeps_finished_blocks(tmp_path, monkeypatch, code, words):
    work = WorkFolder(tmp_path / "w", {"run": 1}, num_blocks=2, needs_hidden=False)
    work.save_block(0, {"a": torch.ones(3)}, [])

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(resume, "write_safetensors", refuse)
    with pytest.raises(WandaError, match=rf"could not write {tmp_path / 'w'}: {words} \(writing block-00001"):
        work.save_block(1, {"a": torch.ones(3)}, [])
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if not p.name.startswith(".")) == [
        "block-00000.safetensors",
        "fingerprint.json",
    ]
    work.abandon()
    assert (tmp_path / "w" / "block-00000.safetensors").is_file()  # finished blocks stay for a resume


def test_a_refused_fingerprint_write_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume.tempfile, "mkstemp", refuse)
    with pytest.raises(WandaError, match=r"could not write .*: no space left on device \(writing fingerprint.json\)"):
        WorkFolder(tmp_path / "w", {"run": 1}, num_blocks=2, needs_hidden=False)
    assert not (tmp_path / "w").exists()


def test_abandon_removes_only_a_folder_this_run_made_without_blocks(tmp_path):
    work = WorkFolder(tmp_path / "new", {"run": 1}, num_blocks=2, needs_hidden=False)
    work.abandon()
    assert not (tmp_path / "new").exists()
    WorkFolder(tmp_path / "old", {"run": 1}, num_blocks=2, needs_hidden=False).release()
    again = WorkFolder(tmp_path / "old", {"run": 1}, num_blocks=2, needs_hidden=False)
    again.abandon()
    assert (tmp_path / "old" / "fingerprint.json").is_file()  # found on disk: not this run's to remove


def test_check_space_sums_needs_per_file_system(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1500, 1500))
    space.check_space([(tmp_path / "a", 1000, "blocks"), (tmp_path / "b", 400, "model")])
    with pytest.raises(
        WandaError, match=r"not enough space in .*: needs 1.60 KB \(blocks 1.00 KB \+ model 600 B\), 1.50 KB free"
    ):
        space.check_space([(tmp_path / "a", 1000, "blocks"), (tmp_path / "b", 600, "model")])
