"""Free space is checked before any work: the sizes a run will write (``wanda.pruning.space``) equal what it
writes, and a disk that cannot hold them refuses the run with one line, leaving no work or output folder."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import save_tiny, word_corpus
from safetensors import safe_open
from test_outputs_vs_inputs import tree_hash

from wanda.cli.main import main
from wanda.engine.streaming import StreamSettings
from wanda.errors import WandaError
from wanda.models.streaming import meta_skeleton
from wanda.models.targets import MatrixTargets
from wanda.pruning.prune_settings import PruneSettings
from wanda.pruning.space import SavePlan, Sized, hidden_files_bytes, saved_weights_bytes, streamed_needs
from wanda.pruning.streamed import prune_streamed
from wanda.utils.space import format_bytes

Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("space-model"), "llama")


def _tensor_bytes(files) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())
    return total


def test_saved_weights_bytes_per_format():
    tensors = [
        Sized("model.layers.0.mlp.up_proj.weight", (10, 100), torch.float16, True),
        Sized("model.norm.weight", (10,), torch.float32, False),
        Sized("model.layers.0.idx", (7,), torch.int64, True),
    ]
    assert saved_weights_bytes(tensors, SavePlan("dense", 0.5)) == 2000 + 40 + 56
    # the matrix: 500 kept fp16 values + 125 bitmask bytes; the rest dense
    assert saved_weights_bytes(tensors, SavePlan("compressed", 0.5)) == 1000 + 125 + 40 + 56
    # nearly dense: the dense encoding is the smaller one
    assert saved_weights_bytes(tensors, SavePlan("compressed", 0.01)) == 2000 + 40 + 56
    # its own ratio (--target_ratios up_proj=0.9): 100 kept values
    plan = SavePlan("compressed", 0.5, MatrixTargets(ratios=(("up_proj", 0.9),)))
    assert saved_weights_bytes(tensors, plan) == 200 + 125 + 40 + 56
    # not pruned (--targets/--ignore leave it out): dense
    assert saved_weights_bytes([tensors[0]._replace(pruned=False)], SavePlan("compressed", 0.5)) == 2000
    # gguf: 100 columns do not split into blocks of 32 (F16); 10 x 96 does (34/32, 18/32 bytes per weight)
    gguf_matrix = Sized("model.layers.0.mlp.up_proj.weight", (10, 96), torch.float32, True)
    assert saved_weights_bytes([gguf_matrix], SavePlan("gguf", gguf_type="Q8_0")) == 30 * 34 + 4  # padded to 32
    assert saved_weights_bytes([gguf_matrix], SavePlan("gguf", gguf_type="Q4_0")) == 30 * 18 + 4
    assert saved_weights_bytes(tensors[:2], SavePlan("gguf", gguf_type="Q4_0")) == 2016 + 64
    # pack-quantized: 10 rows x ceil(96 x 4 / 32) int32 words, 10 x 3 float32 scales, the int64 shape
    plan = SavePlan("compressed-tensors", 0.5, wbits=4, groupsize=32)
    assert saved_weights_bytes([gguf_matrix], plan) == 10 * 12 * 4 + 10 * 3 * 4 + 16
    assert hidden_files_bytes(4, 8, 16, torch.bfloat16) == 2 * 4 * 8 * 16 * 2
    assert hidden_files_bytes(4, 8, 16, torch.float32, world_size=2) == 3 * 4 * 8 * 16 * 4


def test_streamed_needs_equal_what_the_run_writes(tiny, tmp_path):
    """The pruned blocks' bytes and the dense model's weights: the same numbers as the files written."""
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    stream = StreamSettings(offload="disk", work_dir=str(tmp_path / "work"))
    needs = streamed_needs(
        meta_skeleton(tiny, torch.float32), (4, 16), True, stream, tmp_path / "work", str(tmp_path / "out"),
        SavePlan("dense", 0.5), torch.device("cpu"),
    )  # fmt: skip
    sizes = {what: count for _, count, what in needs}
    hidden = json.loads((tiny / "config.json").read_text())["hidden_size"]
    assert sizes["the hidden states between blocks"] == 2 * 4 * 16 * hidden * 4
    run = prune_streamed(
        tiny, ids, PruneSettings(prune_method="wanda"), stream, tmp_path / "out", batch_size=2, progress=False,
        seed=0, cleanup=False,
    )  # fmt: skip
    assert sizes["the pruned blocks"] == _tensor_bytes(sorted((tmp_path / "work").glob("block-*.safetensors")))
    assert sizes["the dense model"] == _tensor_bytes(sorted((tmp_path / "out").glob("*.safetensors")))
    run.cleanup()


def _argv(model: Path, text: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--prune_method", "wanda", "--sparsity_ratio", "0.5", "--nsamples", "4",
        "--calib_dataset", str(text), "--eval_dataset", str(text), "--eval_windows", "1", "--seqlen", "16",
        "--device", "cpu", *extra,
    ]  # fmt: skip


def _refused(argv: list[str], capsys, monkeypatch, free: int) -> str:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert info.value.code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_too_little_space_refuses_before_any_work(tiny, tmp_path, capsys, monkeypatch, offload, save_format):
    model = Path(shutil.copytree(tiny, tmp_path / "model"))
    text = word_corpus(tmp_path / "w.txt", words=4000)
    before = tree_hash(model), text.read_bytes()
    out = tmp_path / "pruned"
    line = _refused(
        _argv(model, text, "--offload", offload, "--save_model", str(out), "--save_format", save_format),
        capsys, monkeypatch, free=999,
    )  # fmt: skip
    assert re.search(
        rf"not enough space in .*{re.escape(str(out))}.*: needs [0-9.]+ [KM]B \(.*the {save_format} model", line
    )
    assert line.endswith("999 B free"), line
    assert offload == "none" or "the pruned blocks" in line, line
    if offload == "none" and save_format == "dense":  # the weights, as the checkpoint holds them (fp32)
        assert f"needs {format_bytes(_tensor_bytes([model / 'model.safetensors']))} (" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w.txt"]  # no work folder, no output folder
    assert (tree_hash(model), text.read_bytes()) == before


def test_a_short_activation_folder_is_named(tiny, tmp_path, capsys, monkeypatch):
    text = word_corpus(tmp_path / "w.txt", words=4000)
    acts = tmp_path / "acts"
    line = _refused(
        _argv(tiny, text, "--offload", "disk", "--offload_activations", str(acts), "--work_dir", str(tmp_path / "wk")),
        capsys, monkeypatch, free=1000,
    )  # fmt: skip
    assert "the activation file" in line and str(acts) in line and str(tmp_path / "wk") in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.txt"]


def test_a_resumed_run_counts_only_the_blocks_still_to_write(tiny, tmp_path):
    work = tmp_path / "work"
    stream = StreamSettings(offload="disk", work_dir=str(work))
    skeleton = meta_skeleton(tiny, torch.float32)
    fresh = streamed_needs(skeleton, None, False, stream, work, None, SavePlan(), torch.device("cpu"))
    work.mkdir()
    (work / "block-00000.safetensors").write_bytes(bytes(1000))
    resumed = streamed_needs(skeleton, None, False, stream, work, None, SavePlan(), torch.device("cpu"))
    assert resumed == [(work, fresh[0][1] - 1000, "the pruned blocks")]


def test_prune_streamed_refuses_before_making_its_work_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 999, 999))
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    stream = StreamSettings(offload="disk", work_dir=str(tmp_path / "work"))
    with pytest.raises(
        WandaError, match=rf"not enough space in {re.escape(str(tmp_path / 'work'))}: needs .* 999 B free"
    ):
        prune_streamed(tiny, ids, PruneSettings(prune_method="wanda"), stream, batch_size=2, progress=False, seed=0)
    assert not (tmp_path / "work").exists()


def _failed(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_a_streamed_run_refused_in_setup_leaves_no_work_folder(tiny, tmp_path, capsys, monkeypatch):
    """Two failures before the first block, under --offload disk: a calibration file holding no text (before
    the work folder is made), and the activation file that the disk cannot hold (after): neither leaves a
    work folder, an activation file or an output behind."""
    text = word_corpus(tmp_path / "w.txt", words=4000)
    (tmp_path / "empty.txt").write_text("\n\n")
    work, out = tmp_path / "wk", tmp_path / "pruned"
    base = ["--offload", "disk", "--work_dir", str(work), "--save_model", str(out)]
    argv = _argv(tiny, text, *base)
    argv[argv.index("--calib_dataset") + 1] = str(tmp_path / "empty.txt")
    assert "empty.txt" in _failed(argv, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "w.txt"]

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    acts = tmp_path / "acts"
    line = _failed(_argv(tiny, text, *base, "--offload_activations", str(acts)), capsys)
    assert line.startswith("wanda: error: not enough space for the activation file"), line
    assert not work.exists() and not out.exists() and list(acts.iterdir()) == []


def _weight_bytes(folder: Path) -> int:
    """The bytes of the tensors a saved folder holds: safetensors data, or a GGUF file less its header."""
    gguf_file = folder / "model.gguf"
    if gguf_file.is_file():
        import gguf

        reader = gguf.GGUFReader(gguf_file)
        return gguf_file.stat().st_size - min(int(t.data_offset) for t in reader.tensors)
    return _tensor_bytes(sorted(folder.glob("*.safetensors")))


@pytest.mark.parametrize(
    "save_format, prune_kw, quant_kw",
    [
        ("dense", {}, {}),
        ("compressed", {}, {}),
        ("compressed", {"ignore": ["mlp"]}, {}),
        ("compressed", {"targets": ["self_attn"], "target_ratios": ["q_proj=0.75"]}, {}),
        ("gguf", {}, {"gguf_type": "Q8_0"}),
        ("gguf", {}, {"gguf_type": "Q4_0"}),
        ("compressed-tensors", {}, {"wbits": 4, "groupsize": 32, "sym": True}),
        ("compressed-tensors", {"ignore": ["down_proj"]}, {"wbits": 8, "groupsize": -1, "sym": True}),
    ],
    ids=["dense", "compressed", "compressed-ignore", "compressed-targets", "Q8_0", "Q4_0", "ct-w4g32", "ct-w8-ignore"],
)
def test_saved_model_needs_equal_what_each_format_writes(tmp_path, save_format, prune_kw, quant_kw):
    """The sized weights of ``--save_model`` equal the bytes of the tensors the save writes, in every format,
    with ``--targets``, ``--ignore`` and ``--target_ratios`` (the GGUF header, a few KB to MB of vocabulary, is
    not sized)."""
    from conftest import calib_ids, tiny_model
    from test_gguf_export import _bpe_tokenizer

    from wanda.export import save_model
    from wanda.export.compressed_tensors import QuantizedModel
    from wanda.pruning.prune import prune
    from wanda.pruning.space import resident_needs
    from wanda.quant.settings import QuantSettings

    if save_format == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    model = tiny_model("llama")
    settings = PruneSettings(prune_method="wanda", sparsity_ratio=0.5, **prune_kw)
    quant = QuantSettings(**quant_kw) if quant_kw else None
    report = prune(model, calib_ids(), settings, progress=False, batch_size=4, quant=quant)
    [(_, need, what)] = resident_needs(model, str(tmp_path / "out"), SavePlan.of(save_format, settings, quant))
    assert what == f"the {save_format} model"
    quantized = None
    if save_format == "compressed-tensors":
        quantized = QuantizedModel(report.quantized, quant.wbits, quant.groupsize, True)
    tokenizer = _bpe_tokenizer() if save_format == "gguf" else None
    gguf_type = quant.gguf_type if save_format == "gguf" else None
    save_model(model, tokenizer, tmp_path / "out", save_format, gguf_type=gguf_type, quantized=quantized)
    assert need == _weight_bytes(tmp_path / "out")


@pytest.mark.parametrize(
    "flags",
    [
        ["--save_format", "gguf", "--gguf_type", "Q4_0"],
        ["--save_format", "compressed-tensors", "--wbits", "4", "--groupsize", "32", "--sym"],
    ],
    ids=["gguf", "compressed-tensors"],
)
def test_too_little_space_for_gguf_or_compressed_tensors_refuses_before_any_work(
    tiny, tmp_path, capsys, monkeypatch, flags
):
    if "compressed-tensors" in flags:
        pytest.importorskip("compressed_tensors")
    model = Path(shutil.copytree(tiny, tmp_path / "model"))
    text = word_corpus(tmp_path / "w.txt", words=4000)
    before = tree_hash(model)
    out = tmp_path / "pruned"
    line = _refused(
        _argv(model, text, "--offload", "none", "--save_model", str(out), *flags), capsys, monkeypatch, free=999
    )
    assert re.search(rf"not enough space in .*{re.escape(str(out))}.*: needs .* \(the {flags[1]} model", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w.txt"]
    assert tree_hash(model) == before


def test_weights_bytes_counts_tied_tensors_once():
    from conftest import tiny_model

    from wanda.utils.space import weights_bytes

    model = tiny_model("llama", tie_word_embeddings=True)
    unique = {id(p): p for p in model.parameters()}.values()
    assert weights_bytes(model) == sum(p.numel() * p.element_size() for p in unique)
    assert weights_bytes(model.half()) == sum(p.numel() * 2 for p in unique)


def test_vision_save_model_too_big_for_the_disk_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    """Sized from the loaded classifier, before the dense evaluation and the pruning; nothing is written."""
    from test_vision import tiny_vit, write_image_tree

    import wanda.jobs.vision as vision_job
    from wanda.utils.space import weights_bytes

    model = tiny_vit(num_labels=2)
    model.save_pretrained(tmp_path / "dense")
    data = write_image_tree(tmp_path / "data", classes=2, per_class=2)
    before = tree_hash(tmp_path / "dense"), tree_hash(data)

    def never(*args, **kwargs):
        raise AssertionError("the run went past the space check")

    monkeypatch.setattr(vision_job, "topk_accuracy", never)
    monkeypatch.setattr(vision_job, "prune_classifier", never)
    argv = ["vision", "--model", "tiny", "--resume", str(tmp_path / "dense"), "--data_path", str(data),
            "--workers", "0", "--prune_metric", "magnitude", "--sparsity", "0.5", "--no_progress",
            "--save", str(tmp_path / "out"), "--save_model", str(tmp_path / "pruned")]  # fmt: skip
    line = _refused(argv, capsys, monkeypatch, free=999)
    need = format_bytes(weights_bytes(model))
    assert f"not enough space in {tmp_path / 'pruned'}: needs {need} (the pruned checkpoint {need}), 999 B free" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dense"]
    assert (tree_hash(tmp_path / "dense"), tree_hash(data)) == before
