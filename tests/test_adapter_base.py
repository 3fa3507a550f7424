"""An adapter fits only its own base: ``finetune merge`` and a LoRA resume compare the recorded base and the
adapter's shapes with the model given, and refuse a mismatch with one line (two tiny bases of different widths)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny, tiny_model, word_corpus
from test_outputs_vs_inputs import tree_hash

from wanda import PruneSettings, prune

pytest.importorskip("peft")

from wanda.cli.main import main  # noqa: E402

FLAGS = ["--block_size", "32", "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--device", "cpu"]


def _pruned(folder: Path, **overrides) -> Path:
    model = tiny_model("llama", **overrides)
    prune(model, None, PruneSettings(prune_method="magnitude"), progress=False)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    narrow = _pruned(save_tiny(root / "a"))
    wide = _pruned(save_tiny(root / "b"), intermediate_size=192)  # another MLP width
    corpus = word_corpus(root / "corpus.txt", words=3000)
    out = root / "adapter"
    code, err = _wanda("lora", "--model", str(narrow), "--dataset", str(corpus), "--output_dir", str(out), *FLAGS)
    assert code == 0, err[-3000:]
    return {"root": root, "narrow": narrow, "wide": wide, "corpus": corpus, "adapter": out}


def _wanda(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main(["finetune", *args], "wanda")
    return exited.value.code, err.getvalue()


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["finetune", *args], "wanda")
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if re.match(r"wanda( [a-z]+)*: error: ", line)]
    assert exited.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _merge(bases, model: Path, adapter: Path, target: Path) -> list[str]:
    return ["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(target), "--device", "cpu"]


def test_the_adapter_records_its_base_as_an_absolute_path(bases):
    config = json.loads((bases["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bases["narrow"].resolve())


def test_merge_onto_another_base_is_refused(bases, tmp_path, capsys):
    before = tree_hash(bases["wide"]), tree_hash(bases["adapter"])
    line = _refused(capsys, *_merge(bases, bases["wide"], bases["adapter"], tmp_path / "m"))
    assert f"the adapter {bases['adapter']} was trained on {bases['narrow'].resolve()}, not on --model" in line, line
    assert not (tmp_path / "m").exists() and (tree_hash(bases["wide"]), tree_hash(bases["adapter"])) == before


def test_shapes_that_do_not_fit_are_refused_whatever_the_name(bases, tmp_path, capsys):
    adapter = Path(shutil.copytree(bases["adapter"], tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(bases["wide"])}))
    line = _refused(capsys, *_merge(bases, bases["wide"], adapter, tmp_path / "m"))
    # the first tensor in the file that does not fit: down_proj's lora_A (its inputs are the MLP width)
    assert line.endswith(
        f"does not fit --model {bases['wide']}: its lora_A of model.layers.0.mlp.down_proj has 128 inputs, "
        "the base's model.layers.0.mlp.down_proj 192"
    ), line
    assert not (tmp_path / "m").exists()


def test_a_copy_of_the_base_is_another_base_and_a_symlink_is_the_same(bases, tmp_path, capsys):
    copy = Path(shutil.copytree(bases["narrow"], tmp_path / "copy"))
    line = _refused(capsys, *_merge(bases, copy, bases["adapter"], tmp_path / "m"))
    assert "was trained on" in line and str(copy) in line, line
    link = tmp_path / "link"
    link.symlink_to(bases["narrow"], target_is_directory=True)
    code, err = _wanda(*_merge(bases, link, bases["adapter"], tmp_path / "m"))
    assert code == 0, err[-3000:]
    assert (tmp_path / "m" / "config.json").is_file()


def test_resuming_an_adapter_on_another_base_is_refused(bases, tmp_path, capsys):
    out = Path(shutil.copytree(bases["adapter"], tmp_path / "out"))
    before = tree_hash(out)
    args = ["lora", "--model", str(bases["wide"]), "--dataset", str(bases["corpus"]), "--output_dir", str(out)]
    line = _refused(capsys, *args, *FLAGS[:2], "--max_steps", "4", "--device", "cpu")
    assert f"the adapter {out / 'checkpoint-2'} was trained on {bases['narrow'].resolve()}" in line, line
    assert tree_hash(out) == before
