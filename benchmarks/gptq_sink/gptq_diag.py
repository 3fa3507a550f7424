"""Plain GPTQ on the dense SmolLM2: each layer's error on its own Hessian against round-to-nearest's, and the
model's perplexity with each. Arguments: grid (q4_0, g128, g32s), percdamp, sink weight (``--sink_weight``)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
import torch
from common import PROTOCOL, protocol_data

import wanda.pruning.prune as P
from wanda import PruneSettings, perplexity, prune
from wanda.models import find_decoder_layout, load_model
from wanda.quant import QuantSettings, rtn_quantize

OUT = Path(__file__).resolve().parents[1] / "results" / "gptq_sink"

PROTO = {**PROTOCOL, "eval_windows": 8}
which = sys.argv[1]
percdamp = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
sink_weight = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
name = f"diag-{which}-{percdamp}" + (f"-sink{sink_weight:g}" if sink_weight != 1 else "")
grid_q = {
    "q4_0": QuantSettings(wbits=4, groupsize=32, sym=True, gguf_type="Q4_0"),
    "g128": QuantSettings(wbits=4, groupsize=128, sym=False),
    "g32s": QuantSettings(wbits=4, groupsize=32, sym=True),
}[which]
grid = grid_q.grid()
rows = []
orig = P._quantize


def wrapped(weight, mask, stat, g, settings):
    out = orig(weight, mask, stat, g, settings)
    gram = P.part(stat, P.Gram)
    H = gram.hessian().double()
    W = weight.double()
    Qg = out[0].double()
    Qr = rtn_quantize(weight, g, mask=mask).double()
    eg = torch.einsum("ij,jk,ik->", W - Qg, H, W - Qg).item()
    er = torch.einsum("ij,jk,ik->", W - Qr, H, W - Qr).item()
    rows.append({"i": len(rows), "shape": list(weight.shape), "gptq": eg, "rtn": er, "ratio": eg / er})
    return out


P._quantize = wrapped
torch.manual_seed(0)
loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
model, tok = loaded.model, loaded.tokenizer
calib, evals = protocol_data(tok, PROTO)

layout = find_decoder_layout(model)
mats = [m for i in range(len(layout.blocks)) for m in layout.matrices(i).prunable.values()]
base = [m.weight.detach().clone() for m in mats]
t = time.time()
prune(
    model,
    calib,
    PruneSettings(prune_method="none", percdamp=percdamp, sink_weight=sink_weight),
    device="cpu",
    progress=False,
    batch_size=2,
    quant=grid_q,
)
print("prune s", time.time() - t, flush=True)
res = {"which": which, "percdamp": percdamp, "sink_weight": sink_weight, "layers": rows}
json.dump(res, open(OUT / f"{name}.json", "w"), indent=1)
r = torch.tensor([x["ratio"] for x in rows])
print(
    "layer ratio gptq/rtn: min %.3f median %.3f max %.3f, >1: %d of %d"
    % (r.min(), r.median(), r.max(), (r > 1).sum(), len(r)),
    flush=True,
)
res["gptq_ppl"] = {k: perplexity(model, w, batch_size=2, progress=False) for k, w in evals.items()}
print(res["gptq_ppl"], flush=True)
with torch.no_grad():
    for m, b in zip(mats, base):
        m.weight.copy_(rtn_quantize(b, grid))
res["rtn_ppl"] = {k: perplexity(model, w, batch_size=2, progress=False) for k, w in evals.items()}
print(res["rtn_ppl"], flush=True)
json.dump(res, open(OUT / f"{name}.json", "w"), indent=1)
r = torch.tensor([x["ratio"] for x in rows])
print(
    "layer ratio gptq/rtn: min %.3f median %.3f max %.3f, >1: %d of %d"
    % (r.min(), r.median(), r.max(), (r > 1).sum(), len(r))
)
