"""A model whose decoder blocks stay on disk: a skeleton on the ``meta`` device with the parts outside the blocks
loaded, and each block materialised from the checkpoint only while it is needed.

The skeleton is built from the config under accelerate's ``init_empty_weights`` (parameters on ``meta``, buffers
such as rotary frequencies computed as usual), so building it costs no memory for weights. Checkpoint names are
mapped to the model's parameter names once (hub checkpoints of some architectures lack the
``base_model_prefix``), and anything that cannot be mapped is refused rather than silently left on ``meta``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import WandaError
from .checkpoint import Checkpoint, combine_digests
from .conversion import ConvertedInfo, conversion_targets
from .discovery import DecoderLayout, find_decoder_layout

log = logging.getLogger(__name__)

__all__ = [
    "StreamedModel",
    "build_skeleton",
    "meta_skeleton",
    "assign_tensor",
    "under_model_names",
    "check_matches_config",
    "meta_model",
]


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter (or buffer) ``name`` of ``model``, replacing what was there (e.g. ``meta``)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise KeyError(name)


def under_model_names(model: nn.Module, checkpoint: Checkpoint) -> Checkpoint:
    """The checkpoint under the model's names: a name as it is, with or without the ``base_model_prefix``, or as
    transformers' conversion mapping renames it; parameters the mapping merges from several tensors (per-expert
    matrices into a fused one) become ``ConvertedInfo`` entries read through the library's converter."""
    state = model.state_dict()
    wanted = set(state.keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    entries: dict = {}
    rest = []
    for key in checkpoint.names():
        candidates = [key, f"{prefix}.{key}"]
        if prefix and key.startswith(prefix + "."):
            candidates.append(key[len(prefix) + 1 :])
        found = next((c for c in candidates if c in wanted), None)
        if found is None:
            rest.append(key)
        else:
            entries[found] = checkpoint.entries[key]
    renamed, merged, converters = conversion_targets(model, rest, wanted - set(entries)) if rest else ({}, {}, {})
    for key, name in renamed.items():
        entries[name] = checkpoint.entries[key]
    for name, sources in merged.items():
        infos = tuple(checkpoint.entries[key] for key, _ in sources)
        entries[name] = ConvertedInfo(
            name,
            tuple(state[name].shape),
            infos[0].dtype,
            infos,
            tuple(pattern for _, pattern in sources),
            converters[sources[0][1]],
        )
    unknown = [key for key in rest if key not in renamed and not any(key == k for s in merged.values() for k, _ in s)]
    if unknown:
        log.debug("checkpoint tensors the model does not use: %s", unknown[:8])
    return Checkpoint(checkpoint.folder, entries)


def _declared(model: nn.Module, attribute: str) -> list[str]:
    """The regex patterns a model class declares for keys transformers tolerates (tied, ignored)."""
    value = getattr(model, attribute, None) or []
    return list(value.keys() if isinstance(value, dict) else value)


def check_matches_config(model: nn.Module, raw: Checkpoint, mapped: Checkpoint, folder: Path) -> None:
    """Refuse a checkpoint that does not fit the model its config builds: a shape that differs (``hidden_size``
    disagreeing with the weights), a parameter without a tensor (``num_hidden_layers`` larger than the
    weights, a tensor deleted) or a tensor no parameter takes (``num_hidden_layers`` smaller). transformers
    would initialise the first randomly and drop the last with only a load report; the one exception is what
    the model class itself declares tied or ignored (``_tied_weights_keys``,
    ``_keys_to_ignore_on_load_missing``/``_unexpected``). ``model`` may live on ``meta``."""
    state = model.state_dict()
    for name, info in mapped.entries.items():
        if name in state and tuple(state[name].shape) != tuple(info.shape):
            raise WandaError(
                f"{folder}: tensor {name} has shape {list(info.shape)} but the config builds "
                f"{list(state[name].shape)}; config.json does not describe these weights"
            )
    # declared tied keys are excused only when the config ties them (else transformers initialises them randomly)
    tolerated_missing = _declared(model, "_keys_to_ignore_on_load_missing")
    if getattr(model.config, "tie_word_embeddings", False):
        tolerated_missing += _declared(model, "_tied_weights_keys")
    missing = [
        name
        for name, _ in model.named_parameters()  # tied parameters once
        if name not in mapped and not any(re.search(p, name) for p in tolerated_missing)
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WandaError(
            f"{folder}: the checkpoint lacks {', '.join(missing[:3])}{more}, which the config's model has "
            "(num_hidden_layers larger than the weights, or a tensor missing); they would be random"
        )
    used = {
        (part.file, part.key)
        for info in mapped.entries.values()
        for part in getattr(info, "sources", (info,))  # a merged parameter: each of its sources
    }
    ignored = _declared(model, "_keys_to_ignore_on_load_unexpected")
    extra = [
        key
        for key, info in raw.entries.items()
        if (info.file, info.key) not in used and not any(re.search(p, key) for p in ignored)
    ]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise WandaError(
            f"{folder}: the checkpoint holds {', '.join(extra[:3])}{more}, which the config's model does not "
            "use (num_hidden_layers smaller than the weights, or another architecture's tensors)"
        )


def meta_model(folder: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The model ``folder``'s config builds, its parameters on ``meta`` (no memory for weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, KeyError, AttributeError) as exc:
        raise WandaError(f"could not build model {folder}: {exc}".splitlines()[0]) from exc


class StreamedModel:
    """The skeleton, its checkpoint (names as the model's) and the decoder layout."""

    def __init__(
        self, model: nn.Module, checkpoint: Checkpoint, layout: DecoderLayout, dtype: torch.dtype, source: str
    ):
        self.model, self.checkpoint, self.layout, self.dtype, self.source = model, checkpoint, layout, dtype, source
        #: block index -> digest of the stored bytes it was last read from (``Checkpoint.source_digest``)
        self.source_digests: dict[int, str] = {}
        #: digest of the tensors outside the blocks that were read with the skeleton
        self.outside_digest: str | None = None

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype the model holds ``name`` in: the run's, or fp32 for what the architecture keeps in fp32
        (``_keep_in_fp32_modules``), as ``from_pretrained`` would load it."""
        try:
            tensor = self.model.get_parameter(name)
        except AttributeError:
            try:
                tensor = self.model.get_buffer(name)
            except AttributeError:
                return self.dtype
        return tensor.dtype if tensor.is_floating_point() else self.dtype

    def read(self, names: list[str], digests: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """The named checkpoint tensors on the CPU, floating ones in the dtype the model holds them in."""
        out = self.checkpoint.read(names, digests=digests)
        return {name: t.to(self.dtype_of(name)) if t.is_floating_point() else t for name, t in out.items()}

    def block_names(self, index: int) -> list[str]:
        """The checkpoint tensors of block ``index`` (the model's names)."""
        prefix = self.layout.block_name(index) + "."
        return [name for name in self.checkpoint.names() if name.startswith(prefix)]

    def outside_names(self) -> list[str]:
        prefix = self.layout.path + "."
        return [name for name in self.checkpoint.names() if not name.startswith(prefix)]

    def load_block(self, index: int, device: torch.device) -> nn.Module:
        """Block ``index`` with its checkpoint tensors on ``device`` (the rest of the model untouched)."""
        block = self.layout.blocks[index]
        prefix = self.layout.block_name(index) + "."
        digests: dict[str, str] = {}
        tensors = self.read(self.block_names(index), digests)
        self.source_digests[index] = combine_digests(digests)
        for name, tensor in tensors.items():
            assign_tensor(self.model, name, tensor.to(device))
        for local, param in block.named_parameters():
            if param.device.type == "meta":
                raise WandaError(
                    f"the checkpoint has no tensor {prefix}{local}; it cannot be streamed (use --offload none)"
                )
        for module in block.modules():  # buffers built with the skeleton (not in the checkpoint) follow the block
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[key] = buffer.to(device)
        return block

    def release_block(self, index: int) -> None:
        """Give block ``index``'s parameters back (to ``meta``): its memory is freed."""
        _to_meta(self.layout.blocks[index].modules())

    def release_outside(self) -> None:
        """Give back the parameters outside the blocks (the embeddings), once pruning has captured block 0's
        inputs and needs them no more; tied parameters stay one parameter."""
        inside = {id(m) for m in self.layout.blocks.modules()}
        _to_meta(m for m in self.model.modules() if id(m) not in inside)


def _to_meta(modules) -> None:
    replaced: dict[int, nn.Parameter] = {}
    for module in modules:
        for key, param in module._parameters.items():
            if param is not None and param.device.type != "meta":
                if id(param) not in replaced:
                    replaced[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                module._parameters[key] = replaced[id(param)]


def meta_skeleton(folder: str | Path, dtype: torch.dtype) -> StreamedModel:
    """The model of ``folder`` with every tensor on ``meta``: its names, shapes and dtypes without a byte read
    (what a run will write can be sized before it starts)."""
    folder = Path(folder)
    raw = Checkpoint.open(folder)
    model = meta_model(folder, dtype)
    model.eval()
    model.config.use_cache = False
    checkpoint = under_model_names(model, raw)
    check_matches_config(model, raw, checkpoint, folder)
    return StreamedModel(model, checkpoint, find_decoder_layout(model), dtype, str(folder))


def build_skeleton(
    folder: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", with_head: bool = True
) -> StreamedModel:
    """The model of ``folder`` with only its non-block tensors loaded, on ``device`` (the LM head too when
    ``with_head``: pruning never runs it, so it is left on ``meta`` then unless it is tied to the embeddings)."""
    folder = Path(folder)
    streamed = meta_skeleton(folder, dtype)
    model, layout = streamed.model, streamed.layout
    head = model.get_output_embeddings()
    head_names = set()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if head is not None and not with_head and not tied:
        head_names = {name for name, p in model.named_parameters() if any(p is q for q in head.parameters())}
    outside = [name for name in streamed.outside_names() if name not in head_names]
    device = torch.device(device)
    digests: dict[str, str] = {}
    for name, tensor in streamed.read(outside, digests).items():
        assign_tensor(model, name, tensor.to(device))
    streamed.outside_digest = combine_digests(digests)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    block_prefix = layout.path + "."
    for name, buffer in list(model.named_buffers()):  # rotary frequencies and the like, built on the CPU
        if not name.startswith(block_prefix) and buffer.device.type != "meta" and buffer.device != device:
            assign_tensor(model, name, buffer.to(device))
    missing = [
        name
        for name, p in model.named_parameters()
        if p.device.type == "meta" and not name.startswith(block_prefix) and name not in head_names
    ]
    if missing:
        raise WandaError(
            f"the checkpoint in {folder} lacks {', '.join(missing[:4])}; it cannot be streamed (use --offload none)"
        )
    return streamed
