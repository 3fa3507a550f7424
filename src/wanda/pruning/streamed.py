"""Pruning a model that stays on disk: the job around the streamed walk.

``prune_streamed`` builds the skeleton (``wanda.models.streaming``), runs ``wanda.pruning.prune.prune`` over
``StreamedBlocks`` (so the walk and the per-block pruning are the in-memory path's), keeps its progress in a
work folder so that a killed run resumes, and writes the pruned model as safetensors shards tensor by tensor
(``wanda.export.shards``). ``open_pruned`` gives the result as a streamed model for evaluation block by block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.resume import WorkFolder, agree_resume_point, tensor_digest
from ..engine.streaming import StreamedBlocks, StreamSettings, activation_bytes
from ..errors import WandaError
from ..export.compressed_stream import save_compressed_streamed
from ..export.save import SAVE_FORMATS, SavedModel, folder_bytes
from ..export.shards import DEFAULT_SHARD_SIZE, write_shards
from ..models.checkpoint import Checkpoint, file_digests, file_entries
from ..models.matrices import matrix_zero_counts, zero_share
from ..models.streaming import StreamedModel, build_skeleton
from ..parallel.ranks import SINGLE, Ranks
from ..quant.settings import QuantSettings
from ..utils.devices import default_batch_size
from ..utils.io import atomic_directory, ensure_free
from ..utils.space import check_space
from .prune import LayerReport, PruneReport, needs_calibration, prune, statistics_needed
from .prune_settings import PruneSettings
from .space import SavePlan, activations_in_work_folder, block_bytes, streamed_needs

log = logging.getLogger(__name__)

__all__ = [
    "StreamedRun",
    "prune_streamed",
    "save_streamed",
    "open_pruned",
    "default_work_dir",
    "streamed_linear_sparsity",
]

#: Files whose bytes a resumed run must find unchanged (besides the tensors).
_FINGERPRINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@dataclass
class StreamedRun:
    report: PruneReport
    #: the block the run started from (0 unless it resumed)
    resumed_from: int
    #: the pruned model's tensors: the source's outside the blocks, the work folder's inside
    checkpoint: Checkpoint
    work: WorkFolder
    streamed: StreamedModel
    saved: SavedModel | None = None
    ranks: Ranks = SINGLE

    def cleanup(self) -> None:
        """Remove the work folder (the run is complete and its result saved or no longer needed), once every
        rank is done reading it."""
        self.ranks.barrier()
        if self.ranks.node_writer:
            self.work.remove()


def default_work_dir(save_model: str | Path | None, fingerprint: dict) -> Path:
    if save_model is not None:
        target = Path(os.path.abspath(Path(save_model).expanduser()))  # "." and "out/.." name their folder
        if not target.name:
            raise WandaError(f"--save_model {save_model} names no folder; give a folder path such as ./pruned")
        return target.with_name(target.name + ".work")
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path.cwd() / f"wanda-work-{digest}"


def _activations_folder(
    stream: StreamSettings,
    work: WorkFolder,
    streamed: StreamedModel,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
) -> Path | None:
    """RAM unless asked for a folder, or unless the activations would not fit beside one block."""
    if calibration_ids is None:
        return None
    if stream.offload_activations:
        return Path(stream.offload_activations)
    hidden = getattr(streamed.model.config, "hidden_size")
    need = activation_bytes(*calibration_ids.shape, hidden, streamed.dtype)
    if activations_in_work_folder(need, block_bytes(streamed), stream, device):
        log.info(
            "calibration activations (%.2f GB) would not fit in memory: memory-mapped in %s", need / 1e9, work.path
        )
        return work.path
    return None


def prune_streamed(
    model_path: str | Path,
    calibration_ids: torch.Tensor | None,
    settings: PruneSettings,
    stream: StreamSettings = StreamSettings(),
    save_model: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    seed: int | None = None,
    tokenizer=None,
    cleanup: bool = True,
    save_format: str = "dense",
    ranks: Ranks = SINGLE,
    quant: QuantSettings | None = None,
) -> StreamedRun:
    """Prune the safetensors checkpoint in ``model_path`` one block at a time; write it to ``save_model``.

    Restarted with the same arguments after a crash, it resumes from the last finished block and gives the
    same bits. ``cleanup``: remove the work folder at the end (only when the model was saved; otherwise the
    caller evaluates from it, then calls ``run.cleanup()``).

    ``ranks``: under torchrun every rank calls this with the same arguments; each streams every block and
    walks its share of the calibration windows, the main rank alone saves the model. The work folder may be on
    each machine's own disk or shared (see ``Ranks.node_writer``); a restart needs the same number of ranks.
    """
    device = torch.device(device)
    with ranks.agreed("reading the checkpoint"):  # a file missing on one machine ends every rank at once
        if save_model is not None and ranks.is_main:
            ensure_free(save_model, overwrite, "model folder")
        if save_format not in SAVE_FORMATS:
            raise WandaError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}; got {save_format!r}")
        if save_format == "gguf":  # the GGUF writer reads the whole model (not yet one tensor at a time)
            raise WandaError("--save_format gguf needs the model in memory: pass --offload none")
        if save_format == "compressed-tensors":  # the library compresses a whole in-memory model
            raise WandaError("--save_format compressed-tensors needs the model in memory: pass --offload none")
        streamed = build_skeleton(model_path, dtype, device, with_head=False)
    batch_size = batch_size or default_batch_size(device)
    calibrated = needs_calibration(settings, quant)
    calibration_ids = calibration_ids if calibrated else None
    quantized = quant is not None and quant.wbits is not None
    fingerprint = {
        "model": str(Path(model_path).resolve()),
        "checkpoint": streamed.checkpoint.signature(),
        # contents: the tensors outside the blocks (read with the skeleton), config and tokenizer files; the
        # blocks' own bytes are checked on resume against the digests stored with each pruned block
        "outside": streamed.outside_digest,
        "files": file_digests(Path(model_path), _FINGERPRINT_FILES),
        "settings": settings.to_dict() | ({"quant": quant.to_dict()} if quantized else {}),
        "seed": seed,
        "dtype": str(dtype),
        "device": device.type,
        "batch_size": batch_size,
        "calibration": tensor_digest(calibration_ids),
        "ranks": ranks.world_size,
    }
    work_dir = Path(stream.work_dir) if stream.work_dir else default_work_dir(save_model, fingerprint)
    num_blocks = len(streamed.layout.blocks)
    needs_hidden = bool(statistics_needed(settings, quant))
    with ranks.agreed("checking the free space"):  # before the work folder exists: a refused run leaves nothing
        if ranks.is_main:
            shape = tuple(calibration_ids.shape) if calibration_ids is not None else None
            check_space(
                streamed_needs(
                    streamed, shape, needs_hidden, stream, work_dir, save_model,
                    SavePlan.of(save_format, settings, quant), device, ranks.world_size,
                )
            )  # fmt: skip
    work = _open_work_folder(work_dir, fingerprint, num_blocks, needs_hidden, ranks, streamed)

    report = PruneReport(settings=fingerprint["settings"])

    def rows(index: int) -> list[dict]:
        prefix = streamed.layout.block_name(index) + "."
        return [asdict(layer) for layer in report.layers if layer.name.startswith(prefix)]

    source = None
    try:  # a failed run gives its work folder back, removed if it made it and finished no block
        for index in range(work.resume_point()):
            report.layers += [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in work.block_layers(index)]
        activations = _activations_folder(stream, work, streamed, calibration_ids, device)
        source = StreamedBlocks(streamed, device, work, activations, rows, drop_outside=True)
        prune(
            streamed.model, calibration_ids, settings, device=device, progress=progress, batch_size=batch_size,
            source=source, ranks=ranks, quant=quant,
            report=report,  # extended block by block, so that each saved block carries its rows
        )  # fmt: skip
    except BaseException:
        work.abandon()
        raise
    finally:
        if source is not None:
            source.close()
    try:  # a failure from here on keeps every pruned block for the same command to save; the lock goes
        with ranks.agreed("reading the pruned blocks"):
            pruned = pruned_checkpoint(streamed, work)
        run = StreamedRun(report, source.resumed_from, pruned, work, streamed, ranks=ranks)
        if save_model is not None:
            with ranks.agreed("saving the pruned model"):  # one writer; the others wait here for its outcome
                if ranks.is_main:
                    try:
                        run.saved = save_streamed(streamed, pruned, save_model, tokenizer, save_format, overwrite)
                    except WandaError as exc:  # a full disk: the work folder stays on purpose, said so
                        raise WandaError(f"{exc}; the pruned blocks stay in {work.path}: run the same command "
                                         "again to save them without pruning again") from exc  # fmt: skip
            if cleanup:
                run.cleanup()
    except BaseException:
        work.release()
        raise
    return run


def _open_work_folder(
    path: Path, fingerprint: dict, num_blocks: int, needs_hidden: bool, ranks: Ranks, streamed: StreamedModel
) -> WorkFolder:
    """The work folder, and the block every rank resumes from. The main rank creates (or checks) the folder
    first, then the other machines' block writers (a folder on each machine's disk), then the remaining
    ranks, so that no rank finds a half-made folder."""
    phase = 0 if ranks.is_main else 1 if ranks.node_writer else 2
    work: WorkFolder | None = None
    for turn in range(3 if ranks.distributed else 1):
        with ranks.agreed("opening the work folder"):
            if phase == turn:
                work = WorkFolder(
                    path, fingerprint, num_blocks, needs_hidden, ranks.rank, ranks.world_size, ranks.node_writer
                )
    assert work is not None
    try:
        work.verify(lambda index: streamed.checkpoint.source_digest(streamed.block_names(index)))
        if ranks.distributed:
            states = ranks.gather(work.local_state(), "agreeing where to resume")
            work.start = agree_resume_point(states, num_blocks, needs_hidden)
    except BaseException:
        work.abandon()
        raise
    return work


def pruned_checkpoint(streamed: StreamedModel, work: WorkFolder) -> Checkpoint:
    entries = {}
    for index in range(len(streamed.layout.blocks)):
        entries.update(file_entries(work.block_file(index)))
    missing = [n for i in range(len(streamed.layout.blocks)) for n in streamed.block_names(i) if n not in entries]
    if missing:
        raise WandaError(f"work folder {work.path} lacks pruned tensors such as {missing[0]}")
    return streamed.checkpoint.with_entries(entries)


def _aliases(model: torch.nn.Module, stored: list[str]) -> dict[str, str]:
    """Tied names (e.g. ``lm_head.weight``) not in the checkpoint -> the stored name holding the same parameter."""
    owner: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in stored:
            owner.setdefault(id(param), name)
    return {
        name: owner[id(param)]
        for name, param in model.named_parameters(remove_duplicate=False)
        if name not in stored and id(param) in owner
    }


def save_streamed(
    streamed: StreamedModel,
    checkpoint: Checkpoint,
    target: str | Path,
    tokenizer=None,
    save_format: str = "dense",
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> SavedModel:
    """Write ``checkpoint`` as a ``from_pretrained`` folder (``dense``) or in the compressed format, one tensor
    in memory at a time; the folder appears atomically."""
    if save_format not in SAVE_FORMATS:
        raise WandaError(f"--save_format must be one of {', '.join(SAVE_FORMATS)}; got {save_format!r}")
    model = streamed.model
    order = [name for name in model.state_dict() if name in checkpoint]
    order += [name for name in checkpoint.names() if name not in set(order)]

    def read(name: str) -> torch.Tensor:  # in the dtype the model holds it in, as save_pretrained writes it
        tensor = checkpoint.read([name])[name]
        return tensor.to(streamed.dtype_of(name)) if tensor.is_floating_point() else tensor

    compression = None
    with atomic_directory(target, overwrite=overwrite) as tmp:
        tokenizer = tokenizer if tokenizer is not None else _tokenizer(streamed.source)
        if save_format == "compressed":
            compression = save_compressed_streamed(model, order, read, _aliases(model, order), tmp, tokenizer)
        else:
            specs = []
            for name in order:
                info = checkpoint.entries[name]
                specs.append(
                    (name, info.shape, streamed.dtype_of(name) if info.dtype.is_floating_point else info.dtype)
                )
            write_shards(tmp, specs, read, max_shard_size)
            model.config.save_pretrained(tmp)
            if model.can_generate() and getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    saved = SavedModel(Path(target), save_format, folder_bytes(target), compression)
    log.info("pruned model written to %s (%s, %.1f MB, streamed)", target, save_format, saved.bytes / 1e6)
    return saved


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        log.info("no tokenizer saved with the model (%s)", str(exc).splitlines()[0])
        return None


def open_pruned(run: StreamedRun, device: torch.device | str = "cpu") -> StreamedModel:
    """The run's pruned model, head loaded, blocks still on disk: for ``streamed_perplexity``."""
    streamed = build_skeleton(run.streamed.source, run.streamed.dtype, device, with_head=True)
    streamed.checkpoint = run.checkpoint
    return streamed


def streamed_linear_sparsity(streamed: StreamedModel) -> float:
    """``models.matrix_zero_counts`` over every block, reading one block at a time (``wanda eval``'s figure for
    a model that is not loaded, the same count as for a loaded one)."""
    counts: dict[str, tuple[int, int]] = {}
    for index in range(len(streamed.layout.blocks)):
        block = streamed.load_block(index, torch.device("cpu"))
        counts.update(matrix_zero_counts(block, streamed.layout.block_name(index)))
        streamed.release_block(index)
    return zero_share(counts)
