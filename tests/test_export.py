"""Export on CPU: compressed checkpoints, the 2:4 check, and the speed-up pipeline with a stand-in backend."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny, tiny_model
from torch import nn

from wanda import PruneSettings, prune
from wanda.errors import WandaError
from wanda.export import (
    SpeedupSettings,
    check_24,
    format_tables,
    load_compressed,
    measure,
    run_speedup,
    save_model,
    sparsify_linears,
)
from wanda.masks import check_nm
from wanda.models import find_linears, load_model
from wanda.models.compressed import MANIFEST_NAME, WEIGHTS_NAME, decode_tensor, encode_tensor, same_bits


def _roundtrip(tensor: torch.Tensor) -> torch.Tensor:
    encoded = encode_tensor(tensor)
    return decode_tensor(encoded.encoding, encoded.parts, encoded.shape, encoded.dtype)


# --- tensor encodings, by hand -------------------------------------------------------------------------


def test_a_24_tensor_takes_the_bitmask_and_no_more_bytes_than_positions_would():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    encoded = encode_tensor(w)
    assert encoded.encoding == "bitmask" and encoded.parts["bitmask"].tolist() == [0b01011001]
    values_and_positions = w.numel() // 2 * w.element_size() + w.numel() // 8  # the old 2:4 encoding's bytes
    assert encoded.nbytes <= values_and_positions
    assert same_bits(_roundtrip(w), w)


def test_legacy_24_encoding_is_still_read():
    # group 1 keeps positions (1, 3), group 2 keeps (0, 3): four 2-bit indices in one byte, first in the low bits
    parts = {
        "values": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
        "indices": torch.tensor([1 | 3 << 2 | 0 << 4 | 3 << 6], dtype=torch.uint8),
    }
    expected = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert same_bits(decode_tensor("2:4", parts, (1, 8), torch.float32), expected)


def test_bitmask_encoding_by_hand_keeps_negative_zero():
    w = torch.zeros(4, 8)
    w[0, 1], w[1, 0] = 1.5, -0.0  # -0.0 has its sign bit set: it is stored as a value
    encoded = encode_tensor(w)
    assert encoded.encoding == "bitmask"
    assert encoded.parts["values"].tolist() == [1.5, 0.0]
    assert torch.signbit(encoded.parts["values"][1])
    assert encoded.parts["bitmask"].tolist() == [0b01000000, 0b10000000, 0, 0]
    back = _roundtrip(w)
    assert same_bits(back, w) and torch.signbit(back[1, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encoding_is_the_smallest_and_exact(dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 32, generator=g).to(dtype)
    sparse90 = dense * (torch.rand(16, 32, generator=g) < 0.1)
    two_four = dense.clone().reshape(16, 8, 4)
    two_four[..., 0::2] = 0
    two_four = two_four.reshape(16, 32)
    four_eight = dense.clone().reshape(16, 4, 8)
    four_eight[..., :4] = 0
    four_eight = four_eight.reshape(16, 32)
    cases = {"dense": dense, "bitmask": sparse90}
    for expected, tensor in cases.items():
        encoded = encode_tensor(tensor)
        assert encoded.encoding == expected
        assert encoded.nbytes <= encoded.dense_nbytes
        assert same_bits(_roundtrip(tensor), tensor)
    for tensor in (two_four, four_eight, two_four[:3]):  # odd sizes pad the last mask byte
        encoded = encode_tensor(tensor)
        assert encoded.encoding == "bitmask" and encoded.nbytes < encoded.dense_nbytes
        assert same_bits(_roundtrip(tensor), tensor)


def test_non_float_tensors_stay_dense():
    ids = torch.tensor([[0, 0, 3, 0]])
    assert encode_tensor(ids).encoding == "dense"


# --- whole-model round trips ---------------------------------------------------------------------------


def _pruned(pattern: str, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    model = tiny_model("llama", **overrides)
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_type=pattern), progress=False)
    return model.to(dtype)


@pytest.mark.parametrize(
    "pattern,dtype",
    [
        ("unstructured", torch.float32),
        ("2:4", torch.float32),
        ("4:8", torch.float32),
        ("2:4", torch.bfloat16),
        ("unstructured", torch.float16),
    ],
)
def test_compressed_roundtrip_is_bit_identical_and_smaller(tmp_path, pattern, dtype):
    model = _pruned(pattern, dtype, tie_word_embeddings=True)
    saved = save_model(model, None, tmp_path / "compressed", "compressed")
    save_model(model, None, tmp_path / "dense", "dense")
    manifest = json.loads((tmp_path / "compressed" / MANIFEST_NAME).read_text())
    encodings = {
        k: v["encoding"] for k, v in manifest["tensors"].items() if ".layers." in k and k.endswith("proj.weight")
    }
    assert set(encodings.values()) == {"bitmask"}
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}

    loaded, tokenizer = load_compressed(tmp_path / "compressed")
    assert tokenizer is None
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert same_bits(restored[key], original[key]), key
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # the same outputs as the dense folder loaded by from_pretrained (the in-memory model may differ in its
    # non-persistent buffers: .to(bfloat16) also casts the rotary frequencies, from_pretrained keeps them fp32)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)

    dense_file = (tmp_path / "dense" / "model.safetensors").stat().st_size
    compressed_file = (tmp_path / "compressed" / WEIGHTS_NAME).stat().st_size
    assert compressed_file < dense_file
    assert saved.compression.file_bytes == compressed_file
    # the pruned matrices alone take (values + 1 bit per weight) / dense = 1/2 + 1/(8 * itemsize)
    pruned_keys = [k for k in encodings]
    ratio = sum(saved.compression.tensor_bytes[k] for k in pruned_keys) / sum(
        saved.compression.dense_tensor_bytes[k] for k in pruned_keys
    )
    assert ratio == pytest.approx(0.5 + 1 / (8 * dtype.itemsize), abs=1e-3)


def test_load_model_reads_a_compressed_folder_with_tokenizer(tmp_path):
    folder = save_tiny(tmp_path)
    source = load_model(str(folder), dtype="float32", device="cpu")
    prune(source.model, None, PruneSettings(prune_method="magnitude", sparsity_type="2:4"), progress=False)
    save_model(source.model, source.tokenizer, tmp_path / "out", "compressed")
    again = load_model(str(tmp_path / "out"), dtype="float32", device="cpu")
    assert again.tokenizer("w1 w2")["input_ids"] == source.tokenizer("w1 w2")["input_ids"]
    for key, tensor in source.model.state_dict().items():
        assert same_bits(again.model.state_dict()[key], tensor), key
    assert not again.model.training and again.model.config.use_cache is False
    half = load_model(str(tmp_path / "out"), dtype="float16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.float16


def test_corrupt_manifest_and_existing_target_are_refused(tmp_path):
    model = _pruned("2:4")
    save_model(model, None, tmp_path / "out", "compressed")
    with pytest.raises(WandaError, match="already exists"):
        save_model(model, None, tmp_path / "out", "compressed")
    with pytest.raises(WandaError, match="save_format"):
        save_model(model, None, tmp_path / "other", "zip")
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["shape"] = [4, 4]
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(WandaError):
        load_compressed(tmp_path / "out")


def test_cli_save_format_compressed(tmp_path, monkeypatch):
    from wanda.cli.main import main

    folder = save_tiny(tmp_path)
    out = tmp_path / "pruned"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--model",
                str(folder),
                "--prune_method",
                "magnitude",
                "--sparsity_type",
                "2:4",
                "--device",
                "cpu",
                "--eval_dataset",
                "none",
                "--save_model",
                str(out),
                "--save_format",
                "compressed",
            ],
            "wanda",
        )
    assert exit_info.value.code == 0
    assert (out / MANIFEST_NAME).is_file() and not (out / "model.safetensors").exists()
    model, tokenizer = load_compressed(out)
    assert tokenizer is not None
    for layer in find_linears(model.model.layers).values():
        assert check_nm(layer.weight == 0, 2, 4)


# --- the 2:4 check and the speed-up pipeline -----------------------------------------------------------


def test_check_24_refuses_a_violation_naming_the_layer():
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    with pytest.raises(WandaError, match=r"layer blocks\.0\.q is not 2:4 sparse: 1 of 4 groups .* row 1, columns 4-7"):
        check_24(w, "blocks.0.q")
    check_24(w[:1], "ok")  # groups with more than 2 zeros are fine
    with pytest.raises(WandaError, match="multiple of 4"):
        check_24(torch.zeros(2, 6), "odd")


class _StandIn:
    """A CPU stand-in for a semi-structured backend: ``convert`` keeps the dense weight."""

    name = "stand-in"

    def __init__(self, refuse_rows: int | None = None):
        self.refuse_rows = refuse_rows
        self.converted = 0

    def problem(self, weight):
        return "too few rows" if weight.shape[0] == self.refuse_rows else None

    def convert(self, weight):
        self.converted += 1
        return weight.clone()


def test_sparsify_refuses_before_changing_any_layer():
    model = _pruned("2:4")
    linears = find_linears(model.model.layers, "model.layers")
    last = list(linears)[-1]
    linears[last].weight.data[0, :4] = 1.0
    backend = _StandIn()
    with pytest.raises(WandaError, match=last.replace(".", r"\.")):
        sparsify_linears(linears, backend)
    assert backend.converted == 0


def test_sparsify_skips_layers_the_kernels_cannot_take():
    model = _pruned("2:4")
    linears = find_linears(model.model.layers, "model.layers")
    report = sparsify_linears(linears, _StandIn(refuse_rows=32))  # k_proj, v_proj: 2 kv heads x 16
    assert sorted(report.skipped) == sorted(n for n in linears if n.endswith(("k_proj", "v_proj")))
    assert len(report.converted) == len(linears) - len(report.skipped)
    assert report.max_layer_error[1] == 0.0


def test_run_speedup_with_a_stand_in_backend():
    model = _pruned("2:4")
    settings = SpeedupSettings(
        decode_tokens=(1, 2),
        prefill_tokens=(8,),
        model_tokens=(4, 1000),
        iters=2,
        warmup=1,
        model_iters=1,
        model_warmup=0,
        model_check_tokens=8,
    )
    result = run_speedup(model, _StandIn(), settings)
    shapes = {t.shape for t in result.layers}
    assert shapes == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert len(result.layers) == 4 * 3 and all(t.dense_ms > 0 and t.sparse_ms > 0 for t in result.layers)
    assert {t.layers for t in result.layers if t.shape == (64, 64)} == {"self_attn.q_proj, self_attn.o_proj"}
    assert [t.tokens for t in result.model] == [4]  # 1000 is beyond the 256-token context
    assert result.check.passed and result.check.logits_error == 0.0 and result.check.top1_agreement == 1.0
    assert result.converted_layers == 14
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["check"]["passed"] is True and "speedup" in payload["layers"][0]
    table = format_tables(result, "tiny")
    assert "| self_attn.q_proj, self_attn.o_proj | 64x64 | decode | 1 |" in table
    assert "Output check passed" in table


def test_run_speedup_refuses_an_unpruned_model():
    with pytest.raises(WandaError, match="is not 2:4 sparse"):
        run_speedup(tiny_model("llama"), _StandIn())


def test_measure_on_cpu():
    timing = measure(lambda: torch.ones(8).sum(), torch.device("cpu"), warmup=1, iters=3)
    assert timing.iters == 3 and 0 < timing.min_ms <= timing.median_ms


def test_speedup_command_without_a_capable_gpu(monkeypatch, capsys):
    from wanda.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["speedup", "--model", "does-not-matter"], "wanda")
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == (
        "wanda speedup: error: 2:4 sparse kernels need a CUDA GPU of compute capability 8.0 or higher; "
        "no CUDA GPU is available\n"
    )


def test_speedup_command_usage_errors_come_first(capsys):
    from wanda.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["speedup", "--model", "x", "--decode_tokens", "1,a"], "wanda")
    assert exit_info.value.code == 2
    assert "token counts" in capsys.readouterr().err
