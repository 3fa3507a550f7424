"""Outputs never touch inputs: every output path is checked against every input after resolving symlinks,
before anything loads, with --overwrite too, in memory and streamed; outputs may not overlap each other."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny, word_corpus

from wanda.cli.main import main
from wanda.errors import WandaError
from wanda.utils.overlap import check_disjoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("disjoint-model"), "llama")


@pytest.fixture
def work(tiny, tmp_path) -> dict[str, Path]:
    """A fresh model folder (under out/inner/model, so that outputs can hold it) and a corpus."""
    model = Path(shutil.copytree(tiny, tmp_path / "out" / "inner" / "model"))
    text = word_corpus(tmp_path / "w.txt", words=4000)
    return {"root": tmp_path, "model": model, "text": text}


def tree_hash(root: Path) -> str:
    """Names, sizes and bytes of every file below ``root``: any change to an input changes it."""
    digest = hashlib.blake2b()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    _, err = capsys.readouterr()
    return info.value.code, err


def _refused(argv: list[str], capsys, match: str, *inputs: Path) -> None:
    before = [tree_hash(p) if p.is_dir() else p.read_bytes() for p in inputs]
    code, err = _run(argv, capsys)
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], errors[0]
    assert [tree_hash(p) if p.is_dir() else p.read_bytes() for p in inputs] == before


def _prune_argv(work, *extra: str) -> list[str]:
    return [
        "--model",
        str(work["model"]),
        "--prune_method",
        "magnitude",
        "--sparsity_ratio",
        "0.5",
        "--calib_dataset",
        str(work["text"]),
        "--eval_dataset",
        str(work["text"]),
        "--eval_windows",
        "1",
        "--seqlen",
        "16",
        "--device",
        "cpu",
        "--overwrite",
        *extra,
    ]


OFFLOADS = ["none", "disk"]


@pytest.mark.parametrize("offload", OFFLOADS)
@pytest.mark.parametrize(
    "spelling",
    [
        lambda w: str(w["model"]),
        lambda w: str(w["model"]) + "/",
        lambda w: os.path.relpath(w["model"]),
        lambda w: str(w["model"] / "sub" / ".."),
    ],
    ids=["same", "trailing-slash", "relative", "dotdot"],
)
def test_save_model_equal_to_model_is_refused(work, offload, spelling, capsys):
    _refused(
        _prune_argv(work, "--offload", offload, "--save_model", spelling(work)),
        capsys,
        "is --model",
        work["model"],
    )


@pytest.mark.parametrize("offload", OFFLOADS)
def test_save_model_through_a_symlink_is_refused(work, offload, capsys):
    link = work["root"] / "link"
    link.symlink_to(work["model"], target_is_directory=True)
    _refused(_prune_argv(work, "--offload", offload, "--save_model", str(link)), capsys, "is --model", work["model"])


@pytest.mark.parametrize("offload", OFFLOADS)
def test_save_model_inside_the_model_is_refused(work, offload, capsys):
    inner = str(work["model"] / "pruned")
    _refused(_prune_argv(work, "--offload", offload, "--save_model", inner), capsys, "is inside --model", work["model"])


@pytest.mark.parametrize("offload", OFFLOADS)
def test_save_model_holding_the_model_is_refused(work, offload, capsys):
    out = str(work["root"] / "out")
    _refused(_prune_argv(work, "--offload", offload, "--save_model", out), capsys, "holds --model", work["model"])


@pytest.mark.parametrize("offload", OFFLOADS)
@pytest.mark.parametrize("flag", ["--save", "--work_dir", "--offload_activations"])
def test_other_outputs_on_the_model_are_refused(work, offload, flag, capsys):
    _refused(_prune_argv(work, "--offload", offload, flag, str(work["model"])), capsys, "is --model", work["model"])


@pytest.mark.parametrize("offload", OFFLOADS)
def test_output_on_the_calibration_file_is_refused(work, offload, capsys):
    _refused(
        _prune_argv(work, "--offload", offload, "--save", str(work["text"])),
        capsys,
        "--calib_dataset",
        work["text"],
        work["model"],
    )


@pytest.mark.parametrize("offload", OFFLOADS)
@pytest.mark.parametrize("other", ["--save", "--work_dir"])
def test_outputs_that_overlap_are_refused_before_the_run(work, offload, other, capsys):
    out = str(work["root"] / "x")
    _refused(
        _prune_argv(work, "--offload", offload, other, out, "--save_model", out),
        capsys,
        "give the outputs separate places",
        work["model"],
    )
    assert not (work["root"] / "x").exists() and not (work["root"] / "x.work").exists()


def test_eval_save_inside_the_model_is_refused(work, capsys):
    argv = ["eval", "--model", str(work["model"]), "--eval_dataset", str(work["text"]), "--device", "cpu"]
    _refused([*argv, "--save", str(work["model"])], capsys, "is --model", work["model"])


def test_merge_output_on_the_adapter_is_refused(work, capsys):
    adapter = work["root"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    argv = ["finetune", "merge", "--model", str(work["model"]), "--adapter", str(adapter), "--overwrite"]
    _refused([*argv, "--output", str(adapter)], capsys, "is --adapter", adapter, work["model"])
    _refused([*argv, "--output", str(work["model"])], capsys, "is --model", adapter, work["model"])


def test_finetune_output_dir_holding_the_model_is_refused(work, capsys):
    argv = ["finetune", "lora", "--model", str(work["model"]), "--dataset", str(work["text"])]
    _refused([*argv, "--output_dir", str(work["root"] / "out")], capsys, "holds --model", work["model"])


def test_names_past_the_file_system_limit_are_refused(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(WandaError, match="temporary names would pass"):
        check_disjoint({}, {"--save_model": tmp_path / ("m" * (limit - 5))})
    check_disjoint({}, {"--save_model": tmp_path / ("m" * (limit - 16))})


def test_hub_ids_and_named_sources_are_not_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_disjoint({"--model": "gpt2", "--calib_dataset": "c4"}, {"--save_model": "gpt2-pruned", "--save": "c4"})


def test_a_results_folder_may_hold_the_model_but_a_model_folder_holds_nothing(tmp_path):
    """``--save`` receives files one by one, so the model may be written inside it (``--save out --save_model
    out/model``); ``--save_model`` is replaced as a whole, so nothing else may live inside it."""
    check_disjoint({}, {"--save": tmp_path / "out", "--save_model": tmp_path / "out" / "model"})
    with pytest.raises(WandaError, match="give the outputs separate places"):
        check_disjoint({}, {"--save_model": tmp_path / "m", "--work_dir": tmp_path / "m" / "work"})
    with pytest.raises(WandaError, match="give the outputs separate places"):
        check_disjoint({}, {"--save": tmp_path / "out", "--save_model": tmp_path / "out"})


@pytest.mark.parametrize("offload", ["auto", "disk"])
def test_the_default_work_folder_is_checked_with_the_outputs(tiny, tmp_path, offload, capsys):
    """``--save_model X`` streams through ``X.work`` when no ``--work_dir`` is given: a model folder of that
    name is an input like any other, refused before anything is made in it (a lock file included)."""
    model = Path(shutil.copytree(tiny, tmp_path / "m.work"))
    work = {"root": tmp_path, "model": model, "text": word_corpus(tmp_path / "w.txt", words=4000)}
    argv = _prune_argv(work, "--offload", offload, "--save_model", str(tmp_path / "m"))
    _refused(argv, capsys, f"the work folder {model} is --model", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.work", "w.txt"]


def test_in_memory_the_default_work_folder_is_no_output(tiny, tmp_path, capsys):
    model = Path(shutil.copytree(tiny, tmp_path / "m.work"))
    work = {"root": tmp_path, "model": model, "text": word_corpus(tmp_path / "w.txt", words=4000)}
    before = tree_hash(model)
    code, err = _run(_prune_argv(work, "--offload", "none", "--save_model", str(tmp_path / "m")), capsys)
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file() and tree_hash(model) == before


def test_a_folder_that_is_not_a_work_folder_is_left_as_it_was(work, capsys):
    notes = work["root"] / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    argv = _prune_argv(work, "--offload", "disk", "--work_dir", str(notes), "--save_model", str(work["root"] / "p"))
    _refused(argv, capsys, "is not a wanda work folder", notes, work["model"])
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert not (work["root"] / "p").exists()


def test_finetune_merge_on_the_model_or_the_output_dir_is_refused(work, capsys):
    out = work["root"] / "adapter-out"
    argv = ["finetune", "lora", "--model", str(work["model"]), "--dataset", str(work["text"]), "--output_dir", str(out)]
    _refused([*argv, "--merge", str(work["model"])], capsys, "--merge", work["model"])
    # the merged folder is replaced whole: being --output_dir, or holding it, would take the adapter with it
    _refused([*argv, "--merge", str(out), "--overwrite_output_dir"], capsys, "give the outputs separate places")
    _refused([*argv, "--merge", str(work["root"])], capsys, "holds --model", work["model"])
    assert not out.exists()
    check_disjoint({}, {"--output_dir": out, "--merge": out / "merged"})  # the default place
    with pytest.raises(WandaError, match="--output_dir .* is inside --merge"):
        check_disjoint({}, {"--output_dir": out / "run", "--merge": out})


def test_vision_save_model_on_its_inputs_is_refused(work, capsys):
    data, dense = work["root"] / "images", work["root"] / "dense"
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)
    dense.mkdir()
    (dense / "config.json").write_text("{}")
    argv = ["vision", "--model", "tiny", "--resume", str(dense), "--data_path", str(data), "--overwrite"]
    _refused([*argv, "--save_model", str(data)], capsys, "is --data_path", data, dense)
    _refused([*argv, "--save_model", str(data / "train" / "pruned")], capsys, "is inside --data_path", data, dense)
    _refused([*argv, "--save_model", str(dense)], capsys, "is --resume", data, dense)
    _refused([*argv, "--save", str(dense)], capsys, "is --resume", data, dense)
