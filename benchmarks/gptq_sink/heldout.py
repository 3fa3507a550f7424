"""GPTQ (Q4_0, dense) per-layer error on held-out inputs vs RTN, under the GPTQ model's own inputs."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
import torch
from common import PROTOCOL, protocol_data

from wanda.models import find_decoder_layout, load_model
from wanda.quant import QuantSettings, rtn_quantize

OUT = Path(__file__).resolve().parents[1] / "results" / "gptq_sink"
SCRATCH = Path("/tmp/wanda-gptq-sink")  # the plain-GPTQ weights, made on first use

pd = float(sys.argv[1])
q = QuantSettings(wbits=4, groupsize=32, sym=True, gguf_type="Q4_0")
grid = q.grid()
torch.manual_seed(0)
loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
model, tok = loaded.model, loaded.tokenizer
calib, evals = protocol_data(tok, {**PROTOCOL, "eval_windows": 4})
layout = find_decoder_layout(model)
names = ["q", "k", "v", "o", "gate", "up", "down"]
mats = [m for i in range(len(layout.blocks)) for m in layout.matrices(i).prunable.values()]
base = [m.weight.detach().clone() for m in mats]
rtn = [rtn_quantize(b, grid) for b in base]
weights = SCRATCH / f"gptq-q4_0-{pd}.pt"
if not weights.is_file():  # plain GPTQ Q4_0 on the dense model, kept for the analyses
    from wanda import PruneSettings, prune

    prune(
        model,
        calib,
        PruneSettings(prune_method="none", percdamp=pd),
        device="cpu",
        progress=False,
        batch_size=2,
        quant=q,
    )
    SCRATCH.mkdir(exist_ok=True)
    torch.save([m.weight.detach().clone() for m in mats], weights)
saved = torch.load(weights)
with torch.no_grad():
    for m, w in zip(mats, saved):
        m.weight.copy_(w)
mods = {m.weight.data_ptr(): k for k, m in enumerate(mats)}
errs = {}


def make(k, lin):
    def f(mod, inp, out):
        x0 = inp[0][:, 0]
        x = inp[0].reshape(-1, inp[0].shape[-1])
        eg = (x @ (base[k] - lin.weight).T).pow(2).sum().item()
        er = (x @ (base[k] - rtn[k]).T).pow(2).sum().item()
        eg0 = (x0 @ (base[k] - lin.weight).T).pow(2).sum().item()
        er0 = (x0 @ (base[k] - rtn[k]).T).pow(2).sum().item()
        a = errs.setdefault(k, [0.0, 0.0, 0.0, 0.0])
        a[2] += eg0
        a[3] += er0
        a[0] += eg
        a[1] += er

    return f


hooks = []
for mod in model.modules():
    if isinstance(mod, torch.nn.Linear) and mod.weight.data_ptr() in mods:
        hooks.append(mod.register_forward_hook(make(mods[mod.weight.data_ptr()], mod)))
out = {}
for label, w in [("calib", calib[:4]), *evals.items()]:
    errs.clear()
    with torch.no_grad():
        for b in w.split(2):
            model(input_ids=b, use_cache=False)
    out[label] = {k: v[0] / v[1] for k, v in errs.items()}
    out[f"{label}, first position"] = {k: v[2] / v[3] for k, v in errs.items()}
json.dump(out, open(OUT / f"heldout-{pd}.json", "w"))
for label, r in out.items():
    for j, n in enumerate(names):
        vals = torch.tensor([r[i] for i in range(j, len(mats), 7)])
        print(label, n, "median %.3f max %.3f >1: %d" % (vals.median(), vals.max(), (vals > 1).sum()))
