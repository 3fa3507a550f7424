"""Corrupt and hostile inputs are refused with one line that says what is wrong and where, before any work,
and nothing from a model folder runs unless the user asked for it."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import calib_ids, save_tiny, tiny_model, word_corpus

from wanda import PruneSettings, WandaError, prune
from wanda.data import calibration_windows, resolve_source
from wanda.eval import perplexity
from wanda.models import ModelSettings, check_seqlen, load_model
from wanda.models.checks import check_finite_weights
from wanda.utils.io import atomic_write_json, check_writable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("hostile-model"), "llama")


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny model folder to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def _refused(match: str, folder: Path, **kwargs) -> str:
    with pytest.raises(WandaError, match=match) as info:
        load_model(str(folder), device="cpu", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# model folders ------------------------------------------------------------------------------------------------


def test_truncated_safetensors_named_with_sizes(copy):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    _refused(
        rf"{weights} is truncated or corrupt: its header describes {len(data)} bytes, the file has "
        rf"{len(data) - 1000}",
        copy,
    )
    weights.write_bytes(data[:5])
    _refused(rf"{weights} is not a valid safetensors file", copy)
    header = b'["not", "a", "header"]'
    weights.write_bytes(len(header).to_bytes(8, "little") + header)
    _refused(rf"{weights} is not a valid safetensors file", copy)


def test_config_that_is_not_json_names_the_line(copy):
    (copy / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    _refused(rf"{copy / 'config.json'} is not valid JSON \(line 3, column 21", copy)


def test_unknown_architecture(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llamazilla"}))
    _refused(r"model_type 'llamazilla' is not an architecture transformers .* knows", copy)
    del config["model_type"]
    (copy / "config.json").write_text(json.dumps(config))
    _refused(r"config.json has no model_type", copy)


def test_missing_tokenizer(copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    _refused(rf"model folder {copy} has no tokenizer", copy)


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    _refused(rf"model folder {copy} holds no weights", copy)


def test_nan_and_inf_weights_named_by_layer_before_any_work(copy, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(copy / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    state["model.layers.0.self_attn.q_proj.weight"][0, :2] = float("inf")
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    _refused(
        r"weights are not finite: model.layers.0.self_attn.q_proj.weight \(0 NaN, 2 Inf\), "
        r"model.layers.1.mlp.down_proj.weight \(1 NaN, 0 Inf\)",
        copy,
    )


def test_finite_check_reads_large_tensors_in_chunks(monkeypatch):
    from wanda.models import checks

    monkeypatch.setattr(checks, "_FINITE_CHUNK", 7)  # many chunks, the bad value in the last one
    model = tiny_model()
    check_finite_weights(model)
    model.model.layers[1].mlp.up_proj.weight.data.view(-1)[-1] = float("-inf")
    with pytest.raises(WandaError, match=r"model.layers.1.mlp.up_proj.weight \(0 NaN, 1 Inf\)"):
        check_finite_weights(model)


MARKER_CODE = """
from pathlib import Path
Path({marker!r}).write_text("executed")
from transformers import LlamaForCausalLM as EvilForCausalLM, LlamaConfig as EvilConfig
"""


def _plant_remote_code(folder: Path, marker: Path, where: str = "config.json") -> None:
    """A config asking for the folder's own module, which would leave ``marker`` behind if it ever ran."""
    (folder / "modeling_evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    (folder / "configuration_evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((folder / where).read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        "AutoTokenizer": ["modeling_evil.EvilTokenizer", None],
    }
    (folder / where).write_text(json.dumps(config))


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_and_never_run(copy, tmp_path, where):
    marker = tmp_path / "marker.txt"
    _plant_remote_code(copy, marker, where)
    _refused(
        rf"{copy / where} asks to run code shipped with the model \(auto_map: .*nothing was run.*"
        r"--trust_remote_code",
        copy,
    )
    with pytest.raises(WandaError, match="--trust_remote_code"):
        ModelSettings(model=str(copy), device="cpu").load()
    assert not marker.exists()


def test_trusted_remote_code_must_live_inside_the_folder(copy, tmp_path):
    marker = tmp_path / "marker.txt"
    _plant_remote_code(copy, marker)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "sub/../../evil.EvilForCausalLM"
    (copy / "config.json").write_text(json.dumps(config))
    _refused(r"auto_map names 'sub/../../evil.py', which is outside", copy, trust_remote_code=True)
    assert not marker.exists()


class _Payload:
    """Unpickling this calls Path.write_text(marker): what a hostile pickle does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_pickled_weights_refused_without_allow_pickle_and_never_unpickled(copy, tmp_path):
    marker = tmp_path / "marker.txt"
    (copy / "model.safetensors").unlink()
    with open(copy / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(marker)}, handle)
    _refused(r"holds only pickled weights \(pytorch_model.bin\), which can run code.*--allow_pickle", copy)
    assert not marker.exists()
    # Allowed, it is still read with torch.load(weights_only=True), which refuses to call anything
    _refused(r"could not load model", copy, allow_pickle=True)
    assert not marker.exists()


def test_pickled_weights_load_with_allow_pickle(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = Path(shutil.copytree(tiny, tmp_path / "model"))
    (folder / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(str(folder), device="cpu", allow_pickle=True)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in model.state_dict().items())


def test_shard_index_cannot_point_outside_the_folder(copy):
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "../../elsewhere/model.safetensors"}})
    )
    _refused(r"model.safetensors.index.json names '../../elsewhere/model.safetensors', which is outside", copy)
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    _refused(r"model.safetensors.index.json has no weight_map", copy)


def test_compressed_manifest_cannot_point_outside_the_folder(tiny, tmp_path):
    from wanda.export import save_model

    loaded = load_model(str(tiny), device="cpu")
    folder = tmp_path / "compressed"
    save_model(loaded.model, loaded.tokenizer, folder, "compressed")
    manifest = json.loads((folder / "wanda_compressed.json").read_text())
    (folder / "wanda_compressed.json").write_text(json.dumps({**manifest, "weights": "../../etc/passwd"}))
    _refused(r"wanda_compressed.json names '../../etc/passwd', which is outside", folder)
    (folder / "wanda_compressed.json").write_text(json.dumps(manifest))
    weights = folder / "compressed.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    _refused(rf"{weights} is truncated or corrupt", folder)


# calibration and evaluation files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.txt", b"", r"empty.txt is empty"),
        ("blank.txt", b" \n\n \t\n", r"blank.txt is empty"),
        ("binary.txt", bytes(range(256)) * 4, r"binary.txt is not a text file \(it holds NUL bytes"),
        (
            "latin1.txt",
            "line one\nline two\ncaf\u00e9 three\n".encode("latin-1"),
            r"latin1.txt is not UTF-8 text: byte 0xe9 on line 3",
        ),
        (
            "broken.jsonl",
            b'{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n',
            r"broken.jsonl line 4 is not JSON",
        ),
        ("broken.json", b'[{"text": "a"},\n {"text": }]', r"broken.json is not valid JSON \(line 2, column 11"),
        ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"nofield.jsonl: line 2 has no field 'text'"),
        ("empties.jsonl", b'{"text": ""}\n{"text": "  "}\n', r"empties.jsonl holds no text"),
        ("number.jsonl", b'{"text": "a"}\n{"text": 3}\n', r"number.jsonl: line 2 field 'text' is int, not text"),
        ("null.jsonl", b'{"text": null}\n', r"null.jsonl: line 1 field 'text' is null, not text"),
        ("list.json", b'[{"text": "a"}, {"text": ["b"]}]', r"list.json: record 1 field 'text' is list, not text"),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad.parquet is not a readable parquet file"),
    ],
)
def test_bad_calibration_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WandaError, match=match) as info:
        resolve_source(str(path), "calibration")
    assert "\n" not in str(info.value)


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for reading waits for a writer for ever; it is refused before anything opens it."""
    import os

    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    with pytest.raises(WandaError, match=r"is not a regular file or folder \(a pipe or a device\)") as info:
        resolve_source(str(fifo), "calibration")
    assert "\n" not in str(info.value)


def test_empty_source_name_is_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WandaError, match="an empty data source name"):
        resolve_source("", "calibration")


# lengths, outputs, numbers -------------------------------------------------------------------------------------


def test_seqlen_beyond_the_context(tiny, tmp_path):
    model = tiny_model()  # max_position_embeddings=256
    check_seqlen(model, 256)
    with pytest.raises(
        WandaError,
        match=r"--seqlen 257 is beyond the model's context of 256 tokens "
        r"\(max_position_embeddings in its config\); use --seqlen 256 or less",
    ):
        check_seqlen(model, 257)
    with pytest.raises(WandaError, match=r"--seqlen 300 is beyond"):
        prune(model, calib_ids(2, 300), PruneSettings(), progress=False)


def test_unwritable_output_refused_before_work(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(WandaError, match=rf"model folder {afile}/sub cannot be created: {afile} is a file"):
        check_writable(afile / "sub", "model folder")
    with pytest.raises(WandaError, match=rf"model folder {afile} is a file; give a folder path"):
        check_writable(afile, "model folder")
    with pytest.raises(WandaError, match=r"cannot be written: /proc"):
        check_writable("/proc/wanda-out", "model folder")
    check_writable(tmp_path / "new" / "deeper", "model folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the probe is gone, nothing created


def _overflowing_fp16_model():
    """The tiny LLaMA in fp16 with block 1's MLP scaled so that its activations pass 65504 (fp16's maximum)
    while block 0's stay finite."""
    model = tiny_model()
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(300)
    return model.half()


def test_fp16_overflow_stops_at_the_block_and_names_the_fix():
    model = _overflowing_fp16_model()
    check_finite_weights(model)  # every weight is a finite fp16 number: only the activations overflow
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        WandaError,
        match=r"the outputs of block model.layers.1 became NaN or Inf \(\d+ NaN, \d+ "
        r"Inf in float16\).*--dtype bfloat16 or --dtype float32",
    ):
        prune(model, calib_ids(4, 32), PruneSettings(prune_method="wanda"), progress=False, batch_size=2)
    layer0 = [k for k in before if k.startswith("model.layers.0.") and k.endswith("proj.weight")]
    assert layer0 and all((model.state_dict()[k] == 0).any() for k in layer0)  # block 0 went through
    # the same model in float32 prunes
    model32 = _overflowing_fp16_model().float()
    report = prune(model32, calib_ids(4, 32), PruneSettings(prune_method="wanda"), progress=False, batch_size=2)
    assert report.actual_sparsity == 0.5


def test_nan_perplexity_reported_as_nan_never_a_number(tmp_path):
    model = _overflowing_fp16_model()
    value = perplexity(model, calib_ids(2, 32), progress=False)
    assert math.isnan(value) or math.isinf(value)
    atomic_write_json(tmp_path / "r.json", {"ppl": value, "ok": 1.5, "list": [float("-inf")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"ppl": str(value), "ok": 1.5, "list": ["-inf"]}
    assert f"{value:.3f}" in ("nan", "inf")


def test_calibration_from_a_good_file_still_works(tiny, tmp_path):
    """The checks refuse only what is broken."""
    loaded = load_model(str(tiny), device="cpu")
    source = resolve_source(str(word_corpus(tmp_path / "c.txt", 2000)), "calibration")
    assert calibration_windows(source, loaded.tokenizer, 4, 32).shape == (4, 32)


# the same through the command line (in-process) ---------------------------------------------------------------


def _wanda(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from wanda.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with pytest.raises(SystemExit) as exited:
            main(argv, "wanda")
    lines = [line for line in err.getvalue().split("\n") if line.strip()]
    assert "Traceback" not in err.getvalue()
    errors = [line for line in lines if ": error: " in line]
    assert exited.value.code == 0 or (len(errors) == 1 and errors[0] == lines[-1]), err.getvalue()
    return exited.value.code, (errors[0] if errors else "")


@pytest.fixture
def never_loads(monkeypatch):
    """Fail the test if the job gets as far as loading the model (a check meant to come before any work)."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(ModelSettings, "load", load)


def test_cli_refuses_remote_code_and_names_the_flag(copy, tmp_path):
    marker = tmp_path / "marker.txt"
    _plant_remote_code(copy, marker)
    code, error = _wanda(["eval", "--model", str(copy), "--eval_dataset", "wiki-summaries", "--device", "cpu"])
    assert code == 2 and error.startswith("wanda eval: error: ") and "--trust_remote_code" in error
    code, error = _wanda(
        ["--model", str(copy), "--device", "cpu", "--prune_method", "magnitude", "--eval_dataset", "none"]
    )
    assert code == 2 and "asks to run code shipped with the model" in error
    assert not marker.exists()


def test_cli_refuses_pickled_weights_and_names_the_flag(copy, tmp_path):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    code, error = _wanda(["eval", "--model", str(copy), "--eval_dataset", "wiki-summaries", "--device", "cpu"])
    assert code == 2 and "holds only pickled weights" in error and "--allow_pickle" in error


@pytest.mark.parametrize("flag", ["--save_model", "--save"])
def test_cli_refuses_an_unwritable_output_before_loading(tiny, tmp_path, never_loads, flag):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, error = _wanda(["--model", str(tiny), "--device", "cpu", flag, str(blocker / "out")])
    assert code == 2 and f"cannot be created: {blocker} is a file" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_cli_refuses_seqlen_beyond_the_context(tiny, tmp_path):
    corpus = word_corpus(tmp_path / "c.txt", 3000)
    code, error = _wanda(
        [
            "--model",
            str(tiny),
            "--device",
            "cpu",
            "--seqlen",
            "100000",
            "--calib_dataset",
            str(corpus),
            "--eval_dataset",
            str(corpus),
            "--nsamples",
            "1",
        ]
    )
    assert code == 2 and "--seqlen 100000 is beyond the model's context of 256 tokens" in error


def test_cli_stops_at_an_overflowing_block(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = _overflowing_fp16_model().float()  # saved in fp32 (finite); run in fp16 with --dtype float16
    folder = tmp_path / "hot"
    model.save_pretrained(folder)
    words = ["<unk>"] + [f"w{i}" for i in range(127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    corpus = word_corpus(tmp_path / "c.txt", 3000)
    code, error = _wanda(
        [
            "--model",
            str(folder),
            "--device",
            "cpu",
            "--dtype",
            "float16",
            "--seqlen",
            "32",
            "--nsamples",
            "4",
            "--calib_dataset",
            str(corpus),
            "--eval_dataset",
            "none",
            "--save_model",
            str(tmp_path / "pruned"),
        ]
    )
    assert code == 2 and "block model.layers.1 became NaN or Inf" in error and "--dtype bfloat16" in error
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("command", ["prune", "eval"])
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_token_ids_beyond_the_embedding_are_refused_before_any_forward(tmp_path, capsys, command, offload):
    """A tokenizer from another model (128 words) on a model whose embedding has 64 rows: one line, exit 2,
    in memory and streamed, and nothing written."""
    from wanda.cli.main import main

    folder = save_tiny(tmp_path)
    small = tiny_model(vocab_size=64)
    small.save_pretrained(folder)  # the 128-word tokenizer stays
    corpus = word_corpus(tmp_path / "corpus.txt", words=2000)
    argv = ["--model", str(folder), "--seqlen", "32", "--eval_windows", "2", "--device", "cpu"]
    argv += ["--offload", offload, "--eval_dataset", str(corpus), "--save", str(tmp_path / "out")]
    if command == "prune":
        argv += ["--prune_method", "wanda", "--sparsity_ratio", "0.5", "--nsamples", "2"]
        argv += ["--calib_dataset", str(corpus), "--save_model", str(tmp_path / "pruned")]
    else:
        argv = ["eval", *argv]
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "embedding has 64 rows" in lines[0] and "does not belong to this model" in lines[0]
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "out").exists()


# the standard input as a text source ---------------------------------------------------------------------------


class _Stdin:
    """A stand-in for ``sys.stdin``: bytes behind ``buffer``, a pipe unless ``tty``."""

    def __init__(self, data: bytes, tty: bool = False):
        import io

        self.buffer, self.closed, self._tty = io.BytesIO(data), False, tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def stdin(monkeypatch):
    from wanda.data import sources

    sources._stdin_text.cache_clear()

    def give(data: bytes, tty: bool = False) -> None:
        monkeypatch.setattr(sources.sys, "stdin", _Stdin(data, tty))

    yield give
    sources._stdin_text.cache_clear()


@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_the_standard_input_is_read_once_as_one_text(stdin, name):
    from wanda.data import resolve_source

    text = "first line of calibration text\nsecond line, ünïcode\n"
    stdin(text.encode())
    calibration = resolve_source(name, "calibration")
    evaluation = resolve_source(name, "evaluation")  # both may name it: the text is read once
    assert calibration.documents == evaluation.documents == [text]


@pytest.mark.parametrize(
    "data, tty, message",
    [
        (b"", False, "the standard input is empty"),
        (b"\x00\x01binary", False, "the standard input is not a text file"),
        (b"caf\xe9\n", False, "the standard input is not UTF-8 text: byte 0xe9 on line 1"),
        (b"text", True, "the standard input is a terminal; pipe the text into it"),
    ],
)
def test_a_standard_input_that_is_not_text_is_one_line(stdin, data, tty, message):
    from wanda.data import resolve_source

    stdin(data, tty)
    with pytest.raises(WandaError, match=message) as info:
        resolve_source("-", "calibration")
    assert "\n" not in str(info.value)
