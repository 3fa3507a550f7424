"""One validated checkpoint reader for every mode: a malformed safetensors header or shard index, duplicate
tensors, and weights that do not fit the config are each one ``wanda: error:`` line and exit 2 under
``--offload auto``, ``none`` and ``disk`` alike, before anything loads, and the input folder is unchanged."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, tiny_model, word_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_outputs_vs_inputs import _refused

from wanda.errors import WandaError
from wanda.models.checkpoint import Checkpoint, read_header

MODES = ["auto", "none", "disk"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("reader-model"), "llama")


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "model"))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return word_corpus(tmp_path_factory.mktemp("reader-text") / "w.txt", words=2000)


def _argv(model: Path, text: Path, mode: str) -> list[str]:
    return [
        "--model",
        str(model),
        "--prune_method",
        "magnitude",
        "--sparsity_ratio",
        "0.5",
        "--calib_dataset",
        str(text),
        "--eval_dataset",
        "none",
        "--seqlen",
        "16",
        "--device",
        "cpu",
        "--offload",
        mode,
    ]


def _header_file(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _good_entry(nbytes: int = 16) -> dict:
    return {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}


#: name -> (the bytes of model.safetensors, what the error line says)
BAD_FILES = {
    "three bytes": (b"abc", "shorter than the 8-byte header size"),
    "header length 2^62": ((1 << 62).to_bytes(8, "little") + b"{}", "its header says 4611686018427387904 bytes"),
    "JSON list": (_header_file(["not", "a", "header"]), "is a JSON list, not an object"),
    "not UTF-8": (_header_file(b'{"\xff\xfe": 1}'), "is not UTF-8"),
    "unknown dtype": (_header_file({"w": {**_good_entry(), "dtype": "F7"}}, bytes(16)), "has dtype 'F7'"),
    "missing data_offsets": (
        _header_file({"w": {"dtype": "F32", "shape": [4]}}, bytes(16)),
        "has data_offsets None",
    ),
    "odd data_offsets": (
        _header_file({"w": {**_good_entry(), "data_offsets": [8, 0]}}, bytes(16)),
        "not [begin, end]",
    ),
    "offsets past the end": (_header_file({"w": _good_entry(64)}, bytes(16)), "is truncated or corrupt"),
    "overlapping": (
        _header_file({"a": _good_entry(16), "b": {**_good_entry(16), "data_offsets": [8, 24]}}, bytes(24)),
        "overlap",
    ),
    "pickle renamed": (pickle.dumps({"w": torch.zeros(4)}), "is not a valid safetensors file"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_safetensors_is_one_line_in_every_mode(model, text, mode, case, capsys):
    data, message = BAD_FILES[case]
    (model / "model.safetensors").write_bytes(data)
    _refused(_argv(model, text, mode), capsys, message, model)


def _sharded(model: Path) -> None:
    """``model`` saved again in two shards with an index."""
    loaded = tiny_model("llama")
    (model / "model.safetensors").unlink()
    loaded.save_pretrained(model, max_shard_size="100KB")
    assert (model / "model.safetensors.index.json").is_file()


BAD_INDEXES = {
    "not JSON": ("{weight_map: ", "is not valid JSON"),
    "weight_map missing": (json.dumps({"metadata": {}}), "has no weight_map"),
    "weight_map null": (json.dumps({"weight_map": None}), "has no weight_map"),
    "weight_map a list": (json.dumps({"weight_map": ["a"]}), "has no weight_map"),
    "a file that is not a string": (json.dumps({"weight_map": {"w": 3}}), "does not name a file"),
    "a missing shard": (json.dumps({"weight_map": {"w": "gone.safetensors"}}), "lists shards that are missing"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_shard_index_is_one_line_in_every_mode(model, text, mode, case, capsys):
    _sharded(model)
    content, message = BAD_INDEXES[case]
    (model / "model.safetensors.index.json").write_text(content)
    _refused(_argv(model, text, mode), capsys, message, model)


@pytest.mark.parametrize("mode", MODES)
def test_a_tensor_stored_in_two_shards_is_refused(model, text, mode, capsys):
    _sharded(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    first = Checkpoint.open(model).read([k for k, f in index["weight_map"].items() if f == shards[0]][:1])
    from safetensors.torch import load_file, save_file

    second = model / shards[1]
    save_file({**load_file(second), **first}, second, metadata={"format": "pt"})
    _refused(_argv(model, text, mode), capsys, "is stored twice", model)


def _with_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 32}, "config.json does not describe these weights"),
        ({"num_hidden_layers": 3}, "lacks model.layers.2."),
        ({"num_hidden_layers": 1}, "holds model.layers.1."),
        ({"tie_word_embeddings": False, "_drop": "lm_head.weight"}, "lacks lm_head.weight"),
        ({"_drop": "model.layers.0.mlp.up_proj.weight"}, "lacks model.layers.0.mlp.up_proj.weight"),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(model, text, mode, change, message, capsys):
    from safetensors.torch import load_file, save_file

    change = dict(change)
    drop = change.pop("_drop", None)
    if drop is not None:
        tensors = load_file(model / "model.safetensors")
        del tensors[drop]
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    _with_config(model, **change)
    _refused(_argv(model, text, mode), capsys, message, model)


def test_tied_head_that_the_model_declares_is_accepted(tmp_path):
    """OPT ties its head to the embeddings: the checkpoint without ``lm_head.weight`` fits its config."""
    from wanda.models.streaming import build_skeleton

    folder = save_tiny(tmp_path, "opt")
    assert "lm_head.weight" not in Checkpoint.open(folder)
    build_skeleton(folder, torch.float32)


# generated headers and indexes -------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F7", "", "f32"]) | _json,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-5, 2**63), min_size=0, max_size=3) | _json,
    },
)
_header = st.dictionaries(st.text(max_size=8), _entry | _json, max_size=4) | _json


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, data=st.binary(max_size=64), length=st.none() | st.integers(0, 2**64 - 1))
def test_generated_headers_are_read_or_refused_in_one_line(tmp_path, header, data, length):
    raw = json.dumps(header).encode()
    size = (len(raw) if length is None else length).to_bytes(8, "little")
    path = tmp_path / "model.safetensors"
    path.write_bytes(size + raw + data)
    try:
        entries = Checkpoint.open(tmp_path).entries
    except WandaError as exc:
        assert "\n" not in str(exc)
    else:  # what was accepted can be read back in full
        Checkpoint(tmp_path, entries).read(list(entries))
        read_header(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=_json | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=6), _json, max_size=3)}))
def test_generated_shard_indexes_are_read_or_refused_in_one_line(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        Checkpoint.open(tmp_path)
    except WandaError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header)
def test_generated_headers_through_the_command_line(tiny, text, tmp_path_factory, mode, header):
    import contextlib
    import io

    from wanda.cli.main import main

    model = Path(shutil.copytree(tiny, tmp_path_factory.mktemp("gen") / "model"))
    (model / "model.safetensors").write_bytes(_header_file(header))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(_argv(model, text, mode), "wanda")
    assert info.value.code == 2 and "Traceback" not in err.getvalue()
    assert err.getvalue().strip().splitlines()[-1].startswith("wanda: error: ")


# resume that continues the same run ---------------------------------------------------------------------------


def _stopped_run(folder: Path, work: Path, stop_after: int) -> None:
    """A streamed run on ``folder`` stopped after block ``stop_after`` was saved (as a kill would leave it)."""
    from wanda.engine.resume import WorkFolder

    class Stop(Exception):
        pass

    original = WorkFolder.save_hidden

    def stopping(self, index, hidden):
        original(self, index, hidden)
        if index == stop_after + 1:
            raise Stop

    WorkFolder.save_hidden = stopping
    try:
        with pytest.raises(Stop):
            _prune(folder, work)
    finally:
        WorkFolder.save_hidden = original


def _prune(folder: Path, work: Path):
    from conftest import calib_ids

    from wanda.engine.streaming import StreamSettings
    from wanda.pruning.prune_settings import PruneSettings
    from wanda.pruning.streamed import prune_streamed

    return prune_streamed(
        folder,
        calib_ids(4, 16),
        PruneSettings(prune_method="wanda"),
        StreamSettings(offload="disk", work_dir=str(work)),
        batch_size=2,
        progress=False,
        seed=0,
        cleanup=False,
    )


@pytest.fixture
def four_blocks(tmp_path) -> Path:
    folder = save_tiny(tmp_path, "llama")
    tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
    return folder


def test_weights_edited_at_the_same_size_are_never_mixed_into_a_resume(four_blocks, tmp_path):
    from safetensors.torch import load_file, save_file

    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    weights = four_blocks / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"] *= 2  # same shapes, same file size, other bytes
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    with pytest.raises(WandaError, match=r"the checkpoint changed since work folder .*block 0's source"):
        _prune(four_blocks, work)


def test_edited_config_is_another_run(four_blocks, tmp_path):
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    _with_config(four_blocks, rms_norm_eps=1e-3)
    with pytest.raises(WandaError, match=r"belongs to another run \(differs in files\)"):
        _prune(four_blocks, work)


def test_a_damaged_work_folder_file_is_redone_and_the_result_is_the_same(four_blocks, tmp_path, caplog):
    straight = _prune(four_blocks, tmp_path / "straight")
    expected = straight.checkpoint.read(straight.checkpoint.names())
    work = tmp_path / "work"
    _stopped_run(four_blocks, work, stop_after=1)
    block = work / "block-00001.safetensors"
    data = bytearray(block.read_bytes())
    data[-3] ^= 0xFF  # an edit inside a tensor
    block.write_bytes(bytes(data))
    run = _prune(four_blocks, work)
    assert any("does not verify" in r.getMessage() and "block-00001" in r.getMessage() for r in caplog.records)
    got = run.checkpoint.read(run.checkpoint.names())
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_second_run_on_the_same_work_folder_is_refused(four_blocks, tmp_path):
    from wanda.engine.resume import WorkFolder

    first = WorkFolder(tmp_path / "work", {"a": 1}, 4, True)
    with pytest.raises(WandaError, match="another run is using work folder"):
        WorkFolder(tmp_path / "work", {"a": 1}, 4, True)
    first.remove()
    WorkFolder(tmp_path / "work", {"a": 1}, 4, True).remove()
