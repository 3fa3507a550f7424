"""Trainer checkpoints that a crash cannot leave half-written, and the choice of the one to resume.

The Trainer writes ``checkpoint-N`` file by file (weights, optimizer, scheduler, RNG, ``trainer_state.json``)
and rotates the old ones away in the same call; killed in between, it leaves a folder that looks like a
checkpoint and cannot be resumed, and with ``save_total_limit`` the older complete ones may be gone already.
``CheckpointTrainer`` writes each checkpoint, fsyncs its files, then writes ``COMPLETE`` (fsynced, renamed into
place) last, and rotates only after that; ``resolve_checkpoint`` resumes the newest checkpoint that holds it,
saying which incomplete ones it passed over. ``save_final`` writes the trained adapter or model beside them with
each file whole (``.final.XXXXXXXX.tmp`` inside ``--output_dir``, fsynced, each file renamed into place).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers import Trainer

from ..errors import WandaError
from ..utils.io import fsync_path, fsync_tree
from ..utils.space import os_reason

log = logging.getLogger(__name__)

__all__ = ["CheckpointTrainer", "COMPLETE", "is_complete", "resolve_checkpoint", "mark_complete", "save_final"]

#: Written last into a finished checkpoint folder.
COMPLETE = "COMPLETE"
_NUMBERED = re.compile(r"^checkpoint-(\d+)$")
#: ``save_final``'s temporary folder (mkdtemp: 8 characters of [a-z0-9_]).
_FINAL_TMP = re.compile(r"^\.final\.[a-z0-9_]{8}\.tmp$")


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def mark_complete(folder: str | Path) -> None:
    """Every file of ``folder`` on disk, then the marker (temporary name, fsync, rename, fsync of the folder)."""
    folder = Path(folder)
    fsync_tree(folder)
    tmp = folder / f".{COMPLETE}.tmp-{os.getpid()}"
    tmp.write_text("complete\n")
    fsync_path(tmp)
    os.replace(tmp, folder / COMPLETE)
    fsync_path(folder)


class CheckpointTrainer(Trainer):
    """A ``Trainer`` whose checkpoints are complete or marked as not (``COMPLETE`` written last)."""

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir() and not is_complete(folder):
            shutil.rmtree(folder)  # a crashed run's half of this step: nothing of it may mix with the new one
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            mark_complete(folder)
            rotate_checkpoints(
                output_dir=str(run_dir), save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )  # fmt: skip


def _step(folder: Path) -> int:
    return int(_NUMBERED.match(folder.name).group(1))


def _numbered(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders, oldest step first."""
    return sorted((p for p in output_dir.iterdir() if _NUMBERED.match(p.name) and p.is_dir()), key=_step)


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from, following ``run_clm.py``.

    An explicit path wins (it must be complete). Otherwise the newest complete ``checkpoint-N`` in
    ``output_dir`` is resumed (incomplete ones newer than it are passed over, with one line), unless
    ``overwrite`` (then old checkpoints are deleted and training starts afresh). A non-empty ``output_dir``
    without a complete checkpoint is refused unless ``overwrite``.
    """
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        _clear_final_leftovers(output_dir)
    if resume_from_checkpoint:
        path = Path(resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            raise WandaError(f"--resume_from_checkpoint {path} is not a Trainer checkpoint (no trainer_state.json)")
        if not is_complete(path):
            raise WandaError(
                f"--resume_from_checkpoint {path} is incomplete (no {COMPLETE} file: its run stopped while "
                "writing it); pass an earlier checkpoint"
            )
        return str(path)
    if not output_dir.is_dir():
        return None
    checkpoints = _numbered(output_dir)
    if overwrite:
        for old in output_dir.glob("checkpoint-*"):
            if old.is_dir():
                shutil.rmtree(old)
        return None
    complete = [p for p in checkpoints if is_complete(p)]
    last = complete[-1] if complete else None
    newest = _step(last) if last is not None else -1
    skipped = [p.name for p in checkpoints if not is_complete(p) and _step(p) > newest]
    if skipped:
        log.warning(
            "skipping incomplete checkpoint%s %s (written by a run that stopped while saving)",
            "s" if len(skipped) > 1 else "",
            ", ".join(skipped),
        )
    if last is not None:
        log.info("resuming from %s; pass --overwrite_output_dir to train from scratch instead", last)
        return str(last)
    if any(output_dir.iterdir()):
        raise WandaError(
            f"--output_dir {output_dir} is not empty and holds no complete checkpoint to resume; "
            "choose another folder or pass --overwrite_output_dir"
        )
    return None


def _clear_final_leftovers(output_dir: Path) -> None:
    for path in output_dir.iterdir():
        if _FINAL_TMP.match(path.name) and path.is_dir() and not path.is_symlink():
            log.warning("removing %s, left by a run that was killed while saving its final weights", path)
            shutil.rmtree(path, ignore_errors=True)


def save_final(trainer: Trainer, output_dir: str | Path) -> None:
    """The trained adapter (or model) into ``output_dir`` beside its checkpoints, each file whole: written into
    a temporary folder inside it (the same file system), fsynced, then each file renamed over the one it
    replaces (the last save of this run, which resumed or was told to start afresh) and the folder fsynced. A
    disk that fills is one line and leaves ``output_dir`` as it was, the checkpoints kept for a resume."""
    from safetensors import SafetensorError

    output_dir = Path(output_dir)
    tmp: Path | None = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        _clear_final_leftovers(output_dir)
        tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=output_dir))
        trainer.save_model(str(tmp))
        fsync_tree(tmp)
        for path in sorted(tmp.iterdir()):
            os.replace(path, output_dir / path.name)
        fsync_path(output_dir)
    except (OSError, SafetensorError) as exc:  # safetensors writes from Rust: its full disk is not an OSError
        if isinstance(exc, OSError):
            reason = os_reason(exc)
        else:
            full = re.search(r"os error 28|code: 28|No space left", str(exc))
            reason = "no space left on device" if full else str(exc).splitlines()[0]
        raise WandaError(
            f"could not write {output_dir}: {reason} (saving the final weights); its checkpoints stay for a resume"
        ) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
