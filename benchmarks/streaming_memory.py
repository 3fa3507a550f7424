"""Memory of streamed pruning: a model 3x larger than the memory used, and SmolLM2 against in-memory.

(a) ``large``: builds a random LLaMA-shaped model on disk (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4
    KV heads, vocabulary 32000: 1.1 B parameters, 4.4 GB of fp32 safetensors in 2 GB shards), one tensor in memory
    at a time, with a word-level tokenizer over its vocabulary and a corpus of random words; prunes it with Wanda
    at 50% through the CLI (``wanda --offload disk --save_model ...``, run in the measuring process), recording
    the peak RSS of the pruning phase and of the whole run and the wall time; then prunes the same model in
    memory with the same calibration windows and checks every tensor of the streamed output equals it bit for
    bit. Calibration: 4 windows of 128 tokens (seed 0), not the paper's 128 x 2048, so that both runs finish in
    minutes on 2 shared cores; the activations held are then 4 MB (the README's formula gives other sizes).
(b) ``smollm2``: the bundled SmolLM2-135M with the paper table's protocol (benchmarks/common.py PROTOCOL: fp32,
    32 calibration windows of 1024 tokens, batch 2), Wanda 50%, in memory and streamed, alternating in the same
    benchmark run: peak RSS of the pruning phase and wall time of load + prune; the streamed model must equal the
    in-memory one bit for bit and evaluate to the same perplexity (block by block) on 8 held-out summary windows.

Each measurement runs in its own process. Results: benchmarks/results/streaming_memory.{json,md}.

    flock /tmp/wanda-heavy.lock python benchmarks/streaming_memory.py            # both parts
    flock /tmp/wanda-heavy.lock python benchmarks/streaming_memory.py --only smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PROTOCOL, RESULTS

from wanda.utils.io import atomic_write_text

LARGE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
#: 4 windows of 128 tokens: the memory figures hardly depend on it (activations 4 x 128 x 2048 x 4 B = 4 MB), and
#: on 2 cores shared with five other jobs two runs of the 1.1 B model must fit in minutes.
LARGE_CALIB = {"nsamples": 4, "seqlen": 128, "seed": 0, "batch_size": 2}
#: Held-out windows for the perplexity check (streamed equals in memory), not the protocol's 40: it is a check,
#: not a quality figure, and the machine is shared.
SMOL_EVAL_WINDOWS = 8
TARGETS = {"large_peak_rss_gb": 1.5, "smollm2_stream_peak_rss_gb": 0.70, "smollm2_wall_ratio": 1.10}


# ---- workers (each in a fresh process) -------------------------------------------------------------------------


def build_large(folder: str) -> dict:
    """The random model, written tensor by tensor (std 0.02 weights, unit norms) into 2 GB shards."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from wanda.export.shards import write_shards
    from wanda.utils.resources import run_peak_rss_mb

    start = time.perf_counter()
    config = LlamaConfig(**LARGE, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    specs = [(name, tuple(p.shape), torch.float32) for name, p in skeleton.named_parameters()]
    gen = torch.Generator().manual_seed(1234)

    def make(name: str) -> torch.Tensor:
        shape = dict((n, s) for n, s, _ in specs)[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        return torch.randn(shape, generator=gen) * 0.02

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_shards(out, specs, make, "2GB")
    config.save_pretrained(out)
    _word_tokenizer().save_pretrained(out)
    words = torch.randint(0, LARGE["vocab_size"] - 3, (20000,), generator=torch.Generator().manual_seed(7)).tolist()
    (out / "corpus.txt").write_text(
        "\n".join(" ".join(f"w{i}" for i in words[k : k + 50]) for k in range(0, len(words), 50)) + "\n"
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "bytes": size,
        "shards": len(list(out.glob("*.safetensors"))),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": run_peak_rss_mb(),
    }


def _word_tokenizer():
    """A word-level tokenizer over the random model's whole vocabulary (w0, w1, ...), so that the CLI can read a
    calibration corpus of such words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(LARGE["vocab_size"] - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _large_calib(folder: str):
    """The calibration windows the CLI draws (same source, tokenizer, sizes and seed)."""
    from transformers import AutoTokenizer

    from wanda.data import calibration_windows, resolve_source

    source = resolve_source(str(Path(folder) / "corpus.txt"), "calibration")
    return calibration_windows(
        source,
        AutoTokenizer.from_pretrained(folder),
        LARGE_CALIB["nsamples"],
        LARGE_CALIB["seqlen"],
        LARGE_CALIB["seed"],
    )


def stream_large(folder: str, output: str) -> dict:
    """``wanda --offload disk`` on the random model, in this process (the command's own code path)."""
    from wanda.cli.main import run
    from wanda.utils.resources import run_peak_rss_mb

    results = Path(output).with_name("results-streamed")
    start = time.perf_counter()
    code = run(
        [
            "--model",
            folder,
            "--offload",
            "disk",
            "--prune_method",
            "wanda",
            "--sparsity_ratio",
            "0.5",
            "--calib_dataset",
            str(Path(folder) / "corpus.txt"),
            "--nsamples",
            str(LARGE_CALIB["nsamples"]),
            "--seqlen",
            str(LARGE_CALIB["seqlen"]),
            "--seed",
            str(LARGE_CALIB["seed"]),
            "--batch_size",
            str(LARGE_CALIB["batch_size"]),
            "--eval_dataset",
            "none",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--save_model",
            output,
            "--save",
            str(results),
        ],
        prog="wanda",
    )
    total = time.perf_counter() - start
    assert code == 0, code
    payload = json.loads((results / "results_wanda.json").read_text())
    return {
        "command": "wanda --offload disk (in-process)",
        "peak_rss_mb_pruning": payload["prune"]["peak_rss_mb"],
        "peak_rss_mb_run": run_peak_rss_mb(),
        "prune_wall_seconds": payload["prune"]["wall_seconds"],
        "total_wall_seconds": total,
        "actual_sparsity": payload["prune"]["actual_sparsity"],
        "output_bytes": sum(f.stat().st_size for f in Path(output).iterdir()),
    }


def memory_large(folder: str, output: str) -> dict:
    """The same pruning with the whole model in RAM; every tensor compared with the streamed output."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from wanda import PruneSettings, prune
    from wanda.utils.resources import run_peak_rss_mb

    start = time.perf_counter()  # the random model has no tokenizer, so not wanda's load_model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, low_cpu_mem_usage=True).eval()
    report = prune(
        model,
        _large_calib(folder),
        PruneSettings(prune_method="wanda", sparsity_ratio=0.5),
        device="cpu",
        progress=False,
        batch_size=LARGE_CALIB["batch_size"],
    )
    wall = time.perf_counter() - start
    state = model.state_dict()
    compared, differ = 0, []
    for shard in sorted(Path(output).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                compared += 1
                if not torch.equal(handle.get_tensor(key), state[key]):
                    differ.append(key)
    return {
        "peak_rss_mb_pruning": report.peak_rss_mb,
        "peak_rss_mb_run": run_peak_rss_mb(),
        "prune_wall_seconds": report.wall_seconds,
        "load_prune_wall_seconds": wall,
        "tensors_compared": compared,
        "tensors_in_model": len(state),
        "tensors_differing": differ,
    }


def _smol_data():
    from common import protocol_data
    from transformers import AutoTokenizer

    from wanda.models.bundled import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())  # not the model: both modes load it timed
    calib, evals = protocol_data(tokenizer)
    return calib, evals["wiki-summaries"][:SMOL_EVAL_WINDOWS]


def smol(mode: str, output: str) -> dict:
    """Load + Wanda 50% on SmolLM2 (``memory`` or ``stream``), timed; then the model saved to ``output`` and its
    held-out perplexity (block by block when streamed)."""
    import torch

    from wanda import PruneSettings, perplexity, prune
    from wanda.engine.streaming import StreamSettings
    from wanda.eval.streamed import streamed_perplexity
    from wanda.export import save_model
    from wanda.models import load_model
    from wanda.models.bundled import bundled_model_dir
    from wanda.pruning.streamed import open_pruned, prune_streamed, save_streamed
    from wanda.utils.resources import release_memory, run_peak_rss_mb

    calib, evals = _smol_data()
    folder = bundled_model_dir()
    settings = PruneSettings(prune_method="wanda", sparsity_ratio=0.5)
    release_memory()
    torch.manual_seed(0)
    start = time.perf_counter()
    if mode == "memory":
        model = load_model("smollm2-135m", dtype=PROTOCOL["dtype"], device="cpu").model
        report = prune(model, calib, settings, device="cpu", progress=False, batch_size=PROTOCOL["batch_size"])
        wall = time.perf_counter() - start
        save_model(model, None, output)
        ppl = perplexity(model, evals, batch_size=PROTOCOL["batch_size"], progress=False)
    else:
        work = Path(output).with_name(Path(output).name + ".work")
        run = prune_streamed(
            folder,
            calib,
            settings,
            StreamSettings(offload="disk", work_dir=str(work)),
            device="cpu",
            batch_size=PROTOCOL["batch_size"],
            progress=False,
            seed=PROTOCOL["seed"],
        )
        report = run.report
        wall = time.perf_counter() - start
        save_streamed(run.streamed, run.checkpoint, output)
        ppl = streamed_perplexity(open_pruned(run), evals, "cpu", PROTOCOL["batch_size"], progress=False)
        run.cleanup()
    return {
        "mode": mode,
        "peak_rss_mb_pruning": report.peak_rss_mb,
        "prune_wall_seconds": report.wall_seconds,
        "load_prune_wall_seconds": wall,
        "actual_sparsity": report.actual_sparsity,
        "ppl_wiki_summaries": ppl,
        "peak_rss_mb_run": run_peak_rss_mb(),
    }


def compare_folders(a: str, b: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    return {"tensors": len(sa), "differing": [k for k in sa if not torch.equal(sa[k], sb[k])]}


WORKERS = {
    "build_large": build_large,
    "stream_large": stream_large,
    "memory_large": memory_large,
    "smol": smol,
    "compare_folders": compare_folders,
}


# ---- driver ----------------------------------------------------------------------------------------------------


def _worker(name: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, *args],
        capture_output=True,
        text=True,
        cwd=str(RESULTS.parent),
        env=env,
    )
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def run_large(scratch: Path) -> dict:
    model, output = scratch / "random-llama-1.1b", scratch / "pruned-streamed"
    built = _worker("build_large", str(model))
    streamed = _worker("stream_large", str(model), str(output))
    memory = _worker("memory_large", str(model), str(output))
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    return {
        "config": LARGE,
        "calibration": LARGE_CALIB,
        "checkpoint": built,
        "streamed": streamed,
        "in_memory": memory,
        "equal": not memory["tensors_differing"] and memory["tensors_compared"] == memory["tensors_in_model"],
    }


def run_smol(scratch: Path, repeats: int) -> dict:
    runs = []
    for k in range(repeats):
        for mode in ("memory", "stream"):  # alternating, so that load on the shared machine hits both alike
            out = scratch / f"smol-{mode}-{k}"
            runs.append({**_worker("smol", mode, str(out)), "folder": str(out)})
    equal = _worker("compare_folders", runs[0]["folder"], runs[1]["folder"])
    for r in runs:
        shutil.rmtree(r.pop("folder"), ignore_errors=True)
    best = {
        m: min((r for r in runs if r["mode"] == m), key=lambda r: r["load_prune_wall_seconds"])
        for m in ("memory", "stream")
    }
    return {
        "protocol": PROTOCOL,
        "runs": runs,
        "equal": not equal["differing"],
        "tensors_compared": equal["tensors"],
        "wall_ratio": best["stream"]["load_prune_wall_seconds"] / best["memory"]["load_prune_wall_seconds"],
        "prune_wall_ratio": best["stream"]["prune_wall_seconds"] / best["memory"]["prune_wall_seconds"],
        "stream_peak_rss_mb_pruning": max(r["peak_rss_mb_pruning"] for r in runs if r["mode"] == "stream"),
        "memory_peak_rss_mb_pruning": max(r["peak_rss_mb_pruning"] for r in runs if r["mode"] == "memory"),
    }


def from_log(path: Path) -> dict:
    """The parts whose workers all finished, from the ``name: {json}`` lines the driver logs."""
    lines = [line.split(": ", 1) for line in path.read_text().splitlines() if line.split(": ", 1)[0] in WORKERS]
    seen: dict[str, list[dict]] = {}
    for name, payload in lines:
        seen.setdefault(name, []).append(json.loads(payload))
    out: dict = {}
    if "smol" in seen and "compare_folders" in seen:
        runs = seen["smol"]
        best = {
            m: min((r for r in runs if r["mode"] == m), key=lambda r: r["load_prune_wall_seconds"])
            for m in ("memory", "stream")
        }
        equal = seen["compare_folders"][0]
        out["smollm2"] = {
            "protocol": PROTOCOL,
            "runs": runs,
            "equal": not equal["differing"],
            "tensors_compared": equal["tensors"],
            "wall_ratio": best["stream"]["load_prune_wall_seconds"] / best["memory"]["load_prune_wall_seconds"],
            "prune_wall_ratio": best["stream"]["prune_wall_seconds"] / best["memory"]["prune_wall_seconds"],
            "stream_peak_rss_mb_pruning": max(r["peak_rss_mb_pruning"] for r in runs if r["mode"] == "stream"),
            "memory_peak_rss_mb_pruning": max(r["peak_rss_mb_pruning"] for r in runs if r["mode"] == "memory"),
        }
    if all(k in seen for k in ("build_large", "stream_large", "memory_large")):
        memory = seen["memory_large"][0]
        out["large"] = {
            "config": LARGE,
            "calibration": LARGE_CALIB,
            "checkpoint": seen["build_large"][0],
            "streamed": seen["stream_large"][0],
            "in_memory": memory,
            "equal": not memory["tensors_differing"] and memory["tensors_compared"] == memory["tensors_in_model"],
        }
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown(result: dict) -> str:
    lines = []
    large = result.get("large")
    if large:
        s, m, c = large["streamed"], large["in_memory"], large["checkpoint"]
        gb = TARGETS["large_peak_rss_gb"]
        lines += [
            f"### (a) Random LLaMA-shaped model, {c['bytes'] / 1e9:.2f} GB of fp32 safetensors in {c['shards']} shards, "
            f"Wanda 50% unstructured",
            "",
            f"Calibration: {large['calibration']['nsamples']} random windows x {large['calibration']['seqlen']} tokens "
            f"(seed {large['calibration']['seed']}, batch {large['calibration']['batch_size']}), not the paper's "
            "128 x 2048, so that both runs fit in minutes on 2 cores shared with other jobs; activations "
            f"{large['calibration']['nsamples'] * large['calibration']['seqlen'] * large['config']['hidden_size'] * 4 / 1e6:.0f} MB.",
            "",
            "| run | peak RSS pruning MB | peak RSS whole run MB | prune wall s | total wall s |",
            "|---|---|---|---|---|",
            f"| streamed (+ save) | {s['peak_rss_mb_pruning']:.0f} | {s['peak_rss_mb_run']:.0f} | "
            f"{s['prune_wall_seconds']:.1f} | {s['total_wall_seconds']:.1f} |",
            f"| in memory | {m['peak_rss_mb_pruning']:.0f} | {m['peak_rss_mb_run']:.0f} | {m['prune_wall_seconds']:.1f} | "
            f"{m['load_prune_wall_seconds']:.1f} (load + prune) |",
            "",
            f"- Streamed output equals the in-memory run: {'yes' if large['equal'] else 'NO'} "
            f"({m['tensors_compared']} tensors compared bit for bit, {len(m['tensors_differing'])} differ).",
            f"- Target peak RSS <= {gb} GB: {_verdict(s['peak_rss_mb_run'] / 1024 <= gb)} "
            f"(whole run {s['peak_rss_mb_run'] / 1024:.2f} GiB, pruning phase {s['peak_rss_mb_pruning'] / 1024:.2f} GiB; "
            f"the model on disk is {c['bytes'] / (s['peak_rss_mb_run'] * 2**20):.1f}x the memory used).",
            "",
        ]
    smol = result.get("smollm2")
    if smol:
        lines += [
            "### (b) SmolLM2-135M, paper-table protocol (fp32, 32 x 1024 calibration, batch 2), Wanda 50%",
            "",
            f"| run | peak RSS pruning MB | prune wall s | load + prune wall s | sparsity | ppl wiki-summaries ({SMOL_EVAL_WINDOWS} windows) |",
            "|---|---|---|---|---|---|",
        ]
        for r in smol["runs"]:
            lines.append(
                f"| {r['mode']} | {r['peak_rss_mb_pruning']:.0f} | {r['prune_wall_seconds']:.1f} | "
                f"{r['load_prune_wall_seconds']:.1f} | {r['actual_sparsity']:.4f} | {r['ppl_wiki_summaries']:.4f} |"
            )
        rss = smol["stream_peak_rss_mb_pruning"] / 1024
        lines += [
            "",
            f"- Streamed model equals the in-memory one: {'yes' if smol['equal'] else 'NO'} "
            f"({smol['tensors_compared']} tensors compared bit for bit).",
            f"- Target streamed peak RSS while pruning <= {TARGETS['smollm2_stream_peak_rss_gb']} GB: "
            f"{_verdict(rss <= TARGETS['smollm2_stream_peak_rss_gb'])} ({rss:.3f} GiB; in memory "
            f"{smol['memory_peak_rss_mb_pruning'] / 1024:.3f} GiB).",
            f"- Target wall time <= {TARGETS['smollm2_wall_ratio']}x in-memory (load + prune, best of "
            f"{len(smol['runs']) // 2} each): {_verdict(smol['wall_ratio'] <= TARGETS['smollm2_wall_ratio'])} "
            f"({smol['wall_ratio']:.3f}x; pruning phase alone {smol['prune_wall_ratio']:.3f}x).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", choices=("large", "smollm2"), help="run one part (the other is kept from the existing results file)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="SmolLM2 runs per mode (default 1)")
    parser.add_argument("--scratch", default=None, help="folder for the 4.4 GB model (default: a temporary folder)")
    parser.add_argument("--from_log", help="build the results from the worker lines of an interrupted run's log")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, *rest = args.worker
        print(json.dumps(WORKERS[name](*rest)))
        return
    out = RESULTS / "streaming_memory"
    result = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    result["targets"] = TARGETS
    if args.from_log:
        result.update(from_log(Path(args.from_log)))
    else:
        scratch = Path(tempfile.mkdtemp(prefix="wanda-stream-bench-", dir=args.scratch))
        try:
            if args.only in (None, "smollm2"):
                result["smollm2"] = run_smol(scratch, args.repeats)
            if args.only in (None, "large"):
                result["large"] = run_large(scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n", overwrite=True)
    table = markdown(result)
    atomic_write_text(out.with_suffix(".md"), table, overwrite=True)
    print(table, file=sys.stderr)


if __name__ == "__main__":
    main()
