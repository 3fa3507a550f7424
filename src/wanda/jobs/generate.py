"""``wanda generate``: greedy text from a saved (pruned) model, with prefill and decode tokens/s.

With ``--sparse_kernel`` the pruned linear layers run on the sparse CPU kernel (``wanda.kernels``), built
straight from the compressed or dense-with-zeros folder, so the figure printed is what a user of the pruned
model gets on this CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..eval.generation import timed_generate
from ..models import ModelSettings, SparseKernelSettings
from ..utils.declare import SettingsMixin, require, setting
from ..utils.resources import peak_rss_mb
from .common import LogSettings

log = logging.getLogger("wanda")

#: The prompt of the demo (and of the greedy-equality acceptance test on SmolLM2-135M).
DEMO_PROMPT = "The capital of France is Paris. The three largest cities of Germany are"


@dataclass(frozen=True)
class GenerateSettings(SettingsMixin):
    prompt: str = setting(DEMO_PROMPT, "text to continue (greedy decoding, batch 1)")
    max_new_tokens: int = setting(64, "how many tokens to generate at most (fewer if the model ends the text)")

    def __post_init__(self) -> None:
        require(bool(self.prompt.strip()), "--prompt is empty; give the text to continue")
        require(self.max_new_tokens >= 1, f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")


#: The settings of ``wanda generate``.
GENERATE_JOB = (ModelSettings, SparseKernelSettings, GenerateSettings, LogSettings)


def run_generate_job(
    model_settings: ModelSettings,
    sparse: SparseKernelSettings,
    generate: GenerateSettings,
    logging_settings: LogSettings,
) -> int:
    loaded = model_settings.load(sparse_kernel=sparse.sparse_kernel, sparse_values=sparse.sparse_values)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(generate.prompt, return_tensors="pt")["input_ids"]
    require(ids.shape[1] > 0, f"--prompt {generate.prompt!r} gives no tokens with this model's tokenizer")
    device = next(model.parameters()).device
    timing = timed_generate(model, ids.to(device), generate.max_new_tokens)
    text = tokenizer.decode(timing.tokens, skip_special_tokens=True)
    print(generate.prompt + text)
    kernel = "sparse kernel" if sparse.sparse_kernel else "dense"
    decode = (
        f"decode {timing.decode_tokens_per_s:.2f} tokens/s ({timing.new_tokens - 1} tokens)"
        if timing.new_tokens > 1
        else "decode: one token only"
    )
    print(
        f"{model_settings.name} ({kernel}, {device.type}): prefill {timing.prefill_tokens_per_s:.1f} tokens/s "
        f"({timing.prompt_tokens} tokens), {decode}, peak RSS {peak_rss_mb():.0f} MiB"
    )
    return 0
