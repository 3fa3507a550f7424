"""One handle on the model a job works on, whether it is loaded whole or streamed from disk block by block.

Every job asks the same few things of its model: the tokenizer and the context length, perplexity on some
windows, the sparsity of its matrices, to be pruned, to be written. ``open_model`` decides once whether the
model is loaded whole (``ResidentModel``) or streamed (``StreamedModelHandle``, ``--offload``), and the jobs
never ask which. Under torchrun the handle holds the ranks, so the evaluation windows are divided here and
nowhere else; the methods, profiles and evaluation functions below it take no ranks.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine.streaming import OffloadSettings, StreamSettings, choose_streaming
from ..errors import WandaError
from ..eval.perplexity import negative_log_likelihood, nll_to_perplexity
from ..eval.streamed import streamed_nll
from ..models import ModelSettings, model_zero_counts, zero_share
from ..models.checkpoint import Checkpoint, is_streamable
from ..models.streaming import build_skeleton, meta_skeleton
from ..parallel.ranks import SINGLE, Ranks
from ..quant.settings import QuantSettings
from ..utils.declare import require
from .prune import PruneReport, needs_calibration, prune, statistics_needed
from .prune_settings import PruneSettings
from .space import SavePlan, resident_needs, streamed_needs
from .streamed import StreamedRun, default_work_dir, open_pruned, prune_streamed, streamed_linear_sparsity

log = logging.getLogger("wanda")

__all__ = ["ModelHandle", "Output", "ResidentModel", "StreamedModelHandle", "open_model", "placement"]

#: What a hub snapshot needs for streaming: config, safetensors shards and index, tokenizer files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class Output:
    """Where and how the pruned model is written (``path`` None: not written)."""

    path: str | None
    format: str = "dense"
    overwrite: bool = False
    gguf_type: str | None = None


class ModelHandle(ABC):
    """What the jobs use of a model. ``prune`` writes ``Output`` before it returns, so that a pruned model is
    on disk before any evaluation that could fail; the main rank alone writes, the others wait for it."""

    streamed: bool = False

    def __init__(self, settings: ModelSettings | None, device: torch.device, dtype: torch.dtype, ranks: Ranks):
        self.settings, self.device, self.dtype, self.ranks = settings, device, dtype, ranks
        self.tokenizer = None

    @abstractmethod
    def open(self) -> None:
        """Load what the job needs before its first step (the model or its skeleton's tokenizer); no
        collective inside, so a caller can wrap it in ``Ranks.agreed``."""

    @property
    @abstractmethod
    def config(self):
        """The model's transformers config (what the context length is read from)."""

    @abstractmethod
    def _nll(self, windows: torch.Tensor, batch_size: int, desc: str) -> tuple[float, int]:
        """Summed NLL and token count over this rank's share of the windows."""

    @abstractmethod
    def zero_share(self) -> float:
        """Zeros among the pruner's own matrices (``models.matrix_zero_counts``)."""

    @abstractmethod
    def prune(
        self,
        calibration_ids: torch.Tensor | None,
        settings: PruneSettings,
        quant: QuantSettings | None,
        batch_size: int,
        output: Output,
        seed: int | None = None,
    ) -> PruneReport: ...

    def space_needs(
        self, calibration_ids: torch.Tensor | None, settings: PruneSettings, quant: QuantSettings | None, output: Output
    ) -> list:
        """What the run will write, as ``wanda.utils.space.check_space`` takes it (checked before any work)."""
        return []

    def perplexity(self, windows: dict[str, torch.Tensor], batch_size: int, label: str) -> dict[str, float]:
        """Perplexity on each set; under torchrun each rank walks its share of whole batches and the losses are
        summed, so the figure is one process's."""
        out = {}
        for name, w in windows.items():
            share = self.ranks.eval_share(w, batch_size)
            nll, tokens = self._nll(share, batch_size, f"{label} ppl {name}") if share.shape[0] else (0.0, 0)
            out[name] = nll_to_perplexity(*self.ranks.sum_nll(nll, tokens))
        return out

    def run_facts(self) -> dict:
        """What the results file says about how the model was held."""
        return {}

    def whole_model(self, purpose: str) -> nn.Module:
        raise WandaError(f"{purpose} needs the whole model in memory: pass --offload none")

    def close(self) -> None:
        """Release what the run keeps until its evaluation is over."""


class ResidentModel(ModelHandle):
    """The model loaded whole (``ModelSettings.load``), pruned in place."""

    def __init__(self, settings, device, dtype, ranks, sparse_kernel: bool = False, sparse_values: str = "auto"):
        super().__init__(settings, device, dtype, ranks)
        self.sparse_kernel = sparse_kernel
        self.sparse_values = sparse_values
        self.model: nn.Module | None = None

    @classmethod
    def of(cls, model: nn.Module, ranks: Ranks = SINGLE, tokenizer=None) -> ResidentModel:
        """A handle on a model already in memory (Python callers, tests)."""
        param = next(model.parameters())
        handle = cls(None, param.device, param.dtype, ranks)
        handle.model, handle.tokenizer = model, tokenizer
        return handle

    def open(self) -> None:
        loaded = self.settings.load(sparse_kernel=self.sparse_kernel, sparse_values=self.sparse_values)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device = next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def _nll(self, windows, batch_size, desc):
        return negative_log_likelihood(
            self.model, windows, batch_size=batch_size, progress=self.ranks.is_main, desc=desc
        )

    def zero_share(self) -> float:
        return zero_share(model_zero_counts(self.model))

    def prune(self, calibration_ids, settings, quant, batch_size, output, seed=None) -> PruneReport:
        report = prune(
            self.model, calibration_ids, settings, device=self.device, batch_size=batch_size, ranks=self.ranks,
            quant=quant,
        )  # fmt: skip
        if output.path is not None:
            from ..export import save_model
            from ..export.compressed_tensors import QuantizedModel

            quantized = None
            if quant is not None and quant.wbits is not None:  # the grid's parameters, for compressed-tensors
                quantized = QuantizedModel(report.quantized, quant.wbits, quant.groupsize, quant.sym)
            with self.ranks.agreed("saving the pruned model"):  # one writer; the others wait for its outcome
                if self.ranks.is_main:
                    save_model(
                        self.model, self.tokenizer, output.path, output.format, output.overwrite, output.gguf_type,
                        quantized,
                    )  # fmt: skip
        return report

    def space_needs(self, calibration_ids, settings, quant, output) -> list:
        return resident_needs(self.model, output.path, SavePlan.of(output.format, settings, quant))

    def whole_model(self, purpose: str) -> nn.Module:
        return self.model


class StreamedModelHandle(ModelHandle):
    """The model left on disk as a safetensors folder and walked block by block (``wanda.pruning.streamed``);
    after ``prune`` it is the pruned run's blocks that are evaluated."""

    streamed = True

    def __init__(self, settings, device, dtype, ranks, folder: Path, stream: OffloadSettings):
        super().__init__(settings, device, dtype, ranks)
        self.folder, self.stream = folder, stream
        self.run: StreamedRun | None = None

    def open(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError) as exc:
            raise WandaError(f"could not load the tokenizer of {self.folder}: {exc}".splitlines()[0]) from exc
        self._config = AutoConfig.from_pretrained(self.folder)

    @property
    def config(self):
        return self._config

    def _nll(self, windows, batch_size, desc):
        streamed = (
            open_pruned(self.run, self.device)
            if self.run is not None
            else build_skeleton(self.folder, self.dtype, self.device)
        )
        activations = Path(self.stream.offload_activations) if self.stream.offload_activations else None
        return streamed_nll(
            streamed, windows, self.device, batch_size, activations=activations, progress=self.ranks.is_main
        )

    def zero_share(self) -> float:
        return streamed_linear_sparsity(build_skeleton(self.folder, self.dtype, "cpu", with_head=False))

    def prune(self, calibration_ids, settings, quant, batch_size, output, seed=None) -> PruneReport:
        if not isinstance(self.stream, StreamSettings):
            raise WandaError("a streamed prune needs the work-folder settings (StreamSettings)")
        self.run = prune_streamed(
            self.folder, calibration_ids, settings, self.stream, output.path, self.device, self.dtype, batch_size,
            overwrite=output.overwrite, seed=seed, tokenizer=self.tokenizer, cleanup=False,
            save_format=output.format, ranks=self.ranks, progress=self.ranks.is_main, quant=quant,
        )  # fmt: skip
        return self.run.report

    def space_needs(self, calibration_ids, settings, quant, output) -> list:
        calibrated = calibration_ids is not None and needs_calibration(settings, quant)
        if self.stream.work_dir or output.path:  # else a wanda-work-<hash> folder here (the hash comes later)
            work = Path(self.stream.work_dir) if self.stream.work_dir else default_work_dir(output.path, {})
        else:
            work = Path.cwd()
        return streamed_needs(
            meta_skeleton(self.folder, self.dtype), tuple(calibration_ids.shape) if calibrated else None,
            bool(statistics_needed(settings, quant)), self.stream, work, output.path,
            SavePlan.of(output.format, settings, quant), self.device, self.ranks.world_size,
        )  # fmt: skip

    def run_facts(self) -> dict:
        return {"streamed": True} | ({"resumed_from_block": self.run.resumed_from} if self.run else {})

    def close(self) -> None:
        if self.run is not None:
            self.run.cleanup()  # after the evaluation: a crash there resumes at the end of the walk


def placement(model: ModelSettings) -> tuple[torch.device, torch.dtype]:
    """The compute device (``cuda:N`` as given) and dtype that ``ModelSettings``' ``--device``/``--dtype`` name."""
    from ..utils.devices import resolve_device, resolve_dtype

    device = resolve_device(model.device)
    return device, resolve_dtype(model.dtype, device)


def _checkpoint_folder(name: str | None, cache_dir: str | None) -> Path | None:
    """The local folder holding ``name``'s weights (the bundled model, a folder, a hub snapshot), else None."""
    from ..models.bundled import BUNDLED_NAME, bundled_model_dir

    if name in (None, BUNDLED_NAME):
        return bundled_model_dir()
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return path if path.is_dir() else None  # a .gguf file cannot be streamed
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - any hub failure means: load it the ordinary way, which reports it
        log.debug("no hub snapshot of %s for streaming: %s", name, exc)
        return None


def streaming_folder(
    name: str | None, cache_dir: str | None, device: torch.device, dtype: torch.dtype, stream: OffloadSettings
) -> Path | None:
    """The safetensors folder to stream ``name`` from, or None to load the whole model: ``--offload none``, a
    checkpoint that fits (``--offload auto``), or weights that cannot be streamed (pickled ``.bin``, GGUF), which
    keep the in-memory path with a line saying how to convert them once."""
    if stream.offload == "none":
        return None
    folder = _checkpoint_folder(name, cache_dir)
    if folder is None or not is_streamable(folder):
        # said when streaming was asked for; under auto only in the debug log (most such models are small)
        log.log(
            logging.INFO if stream.offload == "disk" else logging.DEBUG,
            "%s is not a folder of safetensors weights (GGUF, pickled .bin, or not found), so it is loaded "
            "whole; to stream it, convert it once with save_pretrained(folder) and pass that folder",
            name,
        )
        return None
    checkpoint = Checkpoint.open(folder)
    return folder if choose_streaming(stream, checkpoint.nbytes(dtype), device) else None


def open_model(
    settings: ModelSettings,
    offload: OffloadSettings,
    ranks: Ranks = SINGLE,
    whole_for: str | None = None,
    sparse_kernel: bool = False,
    sparse_values: str = "auto",
) -> ModelHandle:
    """The one place that decides whether a model is streamed: ``--offload disk``, or ``auto`` and a
    safetensors checkpoint that would not fit. ``whole_for``: the flags that need the whole model (zero-shot
    tasks, an adapter, the sparse kernel), which keep it resident (``--offload disk`` with them is refused).
    Under torchrun the ranks agree: when one rank must stream, all of them do. Call ``open()`` next."""
    require(
        whole_for is None or offload.offload != "disk",
        f"--offload disk streams the model, but {whole_for} needs it whole in memory: pass --offload none",
    )
    device, dtype = placement(settings)
    folder = None
    if whole_for is None:
        with ranks.agreed("choosing whether to stream the model"):
            folder = streaming_folder(settings.model, settings.cache_dir, device, dtype, offload)
        # the free memory differs between machines
        if folder is None and any(ranks.gather(folder is not None, "choosing whether to stream the model")):
            with ranks.agreed("choosing whether to stream the model"):
                forced = offload.replace(offload="disk")
                folder = streaming_folder(settings.model, settings.cache_dir, device, dtype, forced)
                require(folder is not None, f"{settings.model} cannot be streamed here, but another rank streams it")
    if folder is not None:
        return StreamedModelHandle(settings, device, dtype, ranks, folder, offload)
    return ResidentModel(settings, device, dtype, ranks, sparse_kernel, sparse_values)
