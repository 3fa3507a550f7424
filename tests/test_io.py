"""Atomic writes: a result appears whole or not at all, and an existing one is never silently replaced."""

from __future__ import annotations

import os

import pytest

from wanda import WandaError
from wanda.utils.io import atomic_directory, atomic_write_json, atomic_write_text, ensure_free


def _tree(root):
    """Every path below ``root``, hidden temporaries included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_atomic_directory_appears_whole(tmp_path):
    target = tmp_path / "out" / "model"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not target.exists()  # nothing visible until the block succeeds
    assert _tree(tmp_path / "out") == ["model", "model/a.txt", "model/sub", "model/sub/b.txt"]


def test_atomic_directory_leaves_nothing_on_an_exception(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("half-way")
    assert _tree(tmp_path) == []


def test_atomic_directory_keeps_the_old_result_on_an_exception(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert _tree(tmp_path) == ["model", "model/old.txt"]


def test_atomic_directory_refuses_a_non_empty_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    entered = False
    with pytest.raises(WandaError, match="already exists.*--overwrite"):
        with atomic_directory(target):
            entered = True
    assert not entered  # refused before any work
    assert _tree(tmp_path) == ["model", "model/old.txt"]


def test_atomic_directory_overwrite_replaces_the_target(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(tmp_path) == ["model", "model/new.txt"]


def test_atomic_directory_accepts_an_empty_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(tmp_path) == ["model", "model/new.txt"]


def test_atomic_directory_exist_ok_keeps_a_concurrent_result(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target, exist_ok=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
        # another process finished first
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert _tree(tmp_path) == ["cache", "cache/theirs.txt"]


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "res" / "results.json"
    atomic_write_json(path, {"ppl": 7.5})
    assert path.read_text() == '{\n  "ppl": 7.5\n}\n'
    with pytest.raises(WandaError, match="already exists"):
        atomic_write_text(path, "other")
    assert path.read_text().startswith("{")
    atomic_write_text(path, "other", overwrite=True)
    assert path.read_text() == "other"
    assert _tree(tmp_path) == ["res", "res/results.json"]


def test_atomic_write_text_leaves_nothing_when_the_rename_fails(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WandaError, match="could not write .*log.txt: disk full"):
        atomic_write_text(tmp_path / "log.txt", "text")
    assert _tree(tmp_path) == []


def test_ensure_free(tmp_path):
    ensure_free(tmp_path / "missing", overwrite=False)
    (tmp_path / "empty").mkdir()
    ensure_free(tmp_path / "empty", overwrite=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WandaError, match="result .*file.txt already exists"):
        ensure_free(tmp_path / "file.txt", overwrite=False, what="result")
    ensure_free(tmp_path / "file.txt", overwrite=True)


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink"])
def test_overwrite_of_a_file_or_symlink_leaves_no_parked_old_result(tmp_path, kind):
    """The parked old result (``.NAME.old-PID``) goes whatever it is; a symlink is replaced, never followed."""
    pointed = tmp_path / "elsewhere"
    pointed.mkdir()
    (pointed / "keep.txt").write_text("keep")
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("old")
    elif kind == "symlink":
        target.symlink_to(pointed)
    else:
        target.symlink_to(tmp_path / "missing")
    with pytest.raises(WandaError, match="already exists"):
        with atomic_directory(target) as tmp:
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert target.is_dir() and not target.is_symlink()
    assert (target / "new.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (pointed / "keep.txt").read_text() == "keep"  # the link's target was never deleted
