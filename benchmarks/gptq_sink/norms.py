import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
import torch
from common import PROTOCOL, protocol_data

from wanda.models import load_model

loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
model, tok = loaded.model, loaded.tokenizer
calib, _ = protocol_data(tok, {**PROTOCOL, "eval_windows": 1})
x4 = calib[:4]
acts = {}


def hook(name):
    def f(m, inp, out):
        acts[name] = inp[0].detach()

    return f


for b in (0, 5, 12, 20):
    L = model.model.layers[b]
    L.self_attn.q_proj.register_forward_hook(hook(f"{b}.q"))
    L.mlp.down_proj.register_forward_hook(hook(f"{b}.down"))
with torch.no_grad():
    model(input_ids=x4)
for k, a in acts.items():
    sq = a.pow(2).sum(-1)  # (batch, seq)
    tot = sq.sum()
    top = sq.flatten().topk(8)
    pos = [divmod(int(i), sq.shape[1])[1] for i in top.indices]
    print(
        k,
        "share of sum x^2 from position 0: %.3f; top-8 tokens share %.3f; top positions %s; median norm2 %.3g max %.3g"
        % (sq[:, 0].sum() / tot, top.values.sum() / tot, pos, sq.median(), sq.max()),
    )
