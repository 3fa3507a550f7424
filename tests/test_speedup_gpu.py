"""2:4 semi-structured kernels on a GPU: sparse versus dense outputs, and the timing pipeline.

Needs a CUDA GPU of compute capability 8.0 or higher; elsewhere every test is skipped with the reason shown
(pytest -ra lists it). Run with ``pytest -m gpu tests/test_speedup_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from wanda import PruneSettings, prune
from wanda.export import SemiStructuredBackend, SpeedupSettings, format_tables, run_speedup, sparsify_linears
from wanda.export.semi_structured import gpu_problem, relative_error
from wanda.export.speedup import time_linears
from wanda.models import find_linears

_PROBLEM = gpu_problem()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_PROBLEM is not None, reason=f"needs a CUDA GPU of compute capability >= 8.0: {_PROBLEM}"),
]


def _backends() -> list:
    from wanda.export import backend_problem

    problems = {name: backend_problem(name) for name in ("cutlass", "cusparselt")} if _PROBLEM is None else {}
    return [
        pytest.param(name, marks=pytest.mark.skipif(problems.get(name) is not None, reason=str(problems.get(name))))
        for name in ("cutlass", "cusparselt")
    ]


@pytest.fixture(params=_backends())
def backend(request) -> SemiStructuredBackend:
    return SemiStructuredBackend(request.param)


def _model_24(dtype: torch.dtype = torch.float16):
    """A small LLaMA whose every linear shape fits both backends (multiples of 64), pruned 2:4 by magnitude."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.config.use_cache = False
    prune(model, None, PruneSettings(prune_method="magnitude", sparsity_type="2:4"), progress=False)
    return model.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_outputs_match_dense(backend, dtype):
    model = _model_24(dtype)
    linears = find_linears(model.model.layers, "model.layers")
    dense_weights = {name: layer.weight.detach().clone() for name, layer in linears.items()}
    ids = torch.randint(0, 256, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits.float()
        report = sparsify_linears(linears, backend, check_tokens=64)
        sparse_logits = model(ids).logits.float()
    assert not report.skipped and len(report.converted) == len(linears)
    for name, layer in linears.items():
        assert isinstance(layer.weight, backend.tensor_class)
        assert torch.equal(layer.weight.to_dense(), dense_weights[name]), name  # packing loses nothing
    assert report.max_layer_error[1] <= SpeedupSettings.layer_rtol
    assert relative_error(sparse_logits, dense_logits) <= SpeedupSettings.model_rtol
    assert (sparse_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean() >= 0.95


def test_run_speedup_times_layers_and_model(backend):
    model = _model_24()
    settings = SpeedupSettings(
        decode_tokens=(1, 16), prefill_tokens=(512,), model_tokens=(16, 256), iters=5, model_iters=3
    )
    result = run_speedup(model, backend, settings)
    assert result.check.passed, format_tables(result)
    assert len(result.layers) == 3 * 3  # distinct shapes (q/k/v/o, gate/up, down) x token counts
    assert all(t.dense_ms > 0 and t.sparse_ms > 0 for t in result.layers)
    assert [t.tokens for t in result.model] == [16, 256]
    print(format_tables(result, f"tiny LLaMA, {backend.name}"))


def test_7b_shaped_layer_timing(backend):
    """One LLaMA-7B-shaped projection (4096 x 4096) at decode and prefill sizes."""
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    weight.view(4096, 1024, 4)[..., :2] = 0
    layer = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.float16)
    layer.weight.data.copy_(weight)
    timings = time_linears(
        {"model.layers.0.self_attn.q_proj": layer},
        backend,
        SpeedupSettings(decode_tokens=(16,), prefill_tokens=(2048,), iters=20),
    )
    assert [t.tokens for t in timings] == [16, 2048]
    for t in timings:
        print(
            f"{backend.name} 4096x4096 x {t.tokens} tokens: dense {t.dense_ms:.4f} ms, sparse {t.sparse_ms:.4f} ms, "
            f"{t.speedup:.2f}x"
        )


def test_speedup_command_end_to_end(tmp_path, capsys):
    from conftest import save_tiny
    from transformers import AutoTokenizer

    from wanda.cli.main import main
    from wanda.export import save_model

    tokenizer_source = save_tiny(tmp_path)  # only for its tokenizer

    model = _model_24(torch.float32).cpu()
    save_model(model, AutoTokenizer.from_pretrained(tokenizer_source), tmp_path / "pruned", "compressed")
    output = tmp_path / "speedup.json"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "speedup",
                "--model",
                str(tmp_path / "pruned"),
                "--decode_tokens",
                "1",
                "--prefill_tokens",
                "512",
                "--model_tokens",
                "64",
                "--iters",
                "3",
                "--model_iters",
                "2",
                "--output",
                str(output),
            ],
            "wanda",
        )
    assert exit_info.value.code == 0
    payload = json.loads(output.read_text())
    assert payload["check"]["passed"] and payload["environment"]["gpu"]
    assert "| whole model, tokens |" in capsys.readouterr().out
