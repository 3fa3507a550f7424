"""``wanda generate`` and ``wanda speedup --device cpu`` on a tiny pruned LLaMA saved compressed and dense.

The greedy tokens printed must be those of ``model.generate`` on the in-memory pruned model (an independent
call), for the dense load and for the sparse kernel alike; bad input is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import one_thread, save_tiny

from wanda.cli.main import main
from wanda.eval.generation import timed_generate
from wanda.models.compressed import save_compressed
from wanda.pruning.prune import prune
from wanda.pruning.prune_settings import PruneSettings

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

PROMPT = "w5 w17 w3 w99 w42"
NEW = 12


@pytest.fixture(autouse=True)
def _tiny_matrices_convert(monkeypatch):
    """The tiny model's matrices are under the load rule's size threshold; lifted so --sparse_kernel runs
    them on the kernel (the rule itself is tested in test_sparse_load.py)."""
    monkeypatch.setenv("WANDA_SPARSE_MIN_WEIGHTS", "0")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("generate")
    base = save_tiny(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_ratio=0.6), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = {}
    for fmt in ("dense", "compressed"):
        folder = root / fmt
        folder.mkdir()
        if fmt == "dense":
            model.save_pretrained(folder)
        else:
            save_compressed(model, folder)
        tokenizer.save_pretrained(folder)
        out[fmt] = folder
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, use_cache=True
        )[0, ids.shape[1] :]
    out["expected"] = tokenizer.decode(expected, skip_special_tokens=True)
    return out


def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv, "wanda")
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
@pytest.mark.parametrize("sparse", [False, True])
def test_generate_prints_the_greedy_text_and_speeds(folders, fmt, sparse, capsys):
    argv = ["generate", "--model", str(folders[fmt]), "--prompt", PROMPT, "--max_new_tokens", str(NEW)]
    argv += ["--device", "cpu"] + (["--sparse_kernel"] if sparse else [])
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    text, speed = out.strip().splitlines()[-2:]
    assert text == PROMPT + folders["expected"]
    match = re.search(r"prefill ([\d.]+) tokens/s \((\d+) tokens\), decode ([\d.]+) tokens/s \((\d+) tokens\)", speed)
    assert match, speed
    assert int(match[2]) == len(PROMPT.split())
    assert float(match[1]) > 0 and float(match[3]) > 0
    assert ("sparse kernel" in speed) is sparse


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
        (["--prompt", "  "], "--prompt is"),
        (["--model", "/nonexistent/model-folder"], "nonexistent"),
        (["--sparse_kernel", "--dtype", "float16"], "fp32 or bf16"),
    ],
)
def test_generate_bad_input_is_one_error_line(folders, flags, message, capsys):
    argv = ["generate", "--model", str(folders["dense"]), "--device", "cpu", *flags]
    code, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("wanda generate: error:"), err
    assert message in lines[0]


def test_timed_generate_counts_every_token_without_eos(folders):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["dense"], dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    timing = timed_generate(model, ids, 7, stop_at_eos=False)
    assert timing.new_tokens == 7 == len(timing.tokens)
    assert timing.prompt_tokens == 4
    assert timing.prefill_s > 0 and timing.decode_s > 0
    assert timing.decode_tokens_per_s == pytest.approx(6 / timing.decode_s)
    with pytest.raises(ValueError):
        timed_generate(model, torch.tensor([[1, 2], [3, 4]]), 2)


def test_speedup_on_cpu_writes_dense_and_sparse_rows(folders, tmp_path, capsys):
    output = tmp_path / "speed.json"
    argv = ["speedup", "--device", "cpu", "--model", str(folders["compressed"]), "--output", str(output)]
    argv += ["--cpu_prompt_tokens", "8", "--cpu_new_tokens", "4", "--cpu_prefill_tokens", "16", "--cpu_iters", "2"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    result = json.loads(output.read_text())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folders["dense"])
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    assert sorted(tuple(r["shape"]) for r in result["matrices"]) == sorted({(h, h), (kv, h), (i, h), (h, i)})
    assert sum(r["count"] for r in result["matrices"]) == 7 * config.num_hidden_layers
    for row in result["matrices"]:
        assert row["sparse_bytes"] < row["dense_bytes"]
        for key in ("dense_decode", "sparse_decode", "dense_prefill", "sparse_prefill"):
            assert row[f"{key}_tokens_per_s"] > 0
    whole = result["model"]
    assert whole["dense"]["sparse_linears"] == 0
    assert whole["sparse"]["sparse_linears"] == 7 * config.num_hidden_layers
    assert whole["sparse"]["bytes_per_token"] < whole["dense"]["bytes_per_token"]
    assert whole["same_tokens"] and len(whole["dense"]["tokens"]) == 4
    assert whole["dense"]["prefill_tokens"] == 16
    for variant in ("dense", "sparse"):
        assert whole[variant]["load_peak_rss_mb"] >= whole[variant]["rss_before_load_mb"] > 0
    assert "sparse/dense: decode" in out
    code, _, err = _run(argv, capsys)  # an existing --output is never replaced silently
    assert code == 2 and "error:" in err
