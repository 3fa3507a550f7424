#!/usr/bin/env bash
# Everything that needs a CUDA GPU, as one short run (a lent GPU machine is billed by the minute):
#   1. the GPU tests (pruning on CUDA against the CPU, 2:4 semi-structured kernels against dense);
#   2. the 2:4 speed-up table (benchmarks/speedup_gpu.py) on LLaMA-7B-shaped random blocks;
#   3. the pruning-speed table (benchmarks/pruning_speed.py) on LLaMA-7B-shaped random blocks.
# The bundled SmolLM2 is skipped: its package (94 MB) does not travel to a remote GPU machine here.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh        # results and logs land in $OUT
#
# Works from a checkout without installing the package (PYTHONPATH=src) on a machine that has torch,
# transformers, safetensors and pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'cusparselt', torch.backends.cusparselt.is_available())"
  timeout 170 $PY -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_cuda_pruning.py tests/test_speedup_gpu.py
} 2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 200 $PY benchmarks/speedup_gpu.py --skip_smollm --blocks 4 --output "$OUT/speedup" 2>&1 \
  | tee "$OUT/speedup.log" || status=1
timeout 150 $PY benchmarks/pruning_speed.py --device cuda --smollm_windows 0 --llama_blocks 2 \
  --output "$OUT/pruning_speed" 2>&1 | tee "$OUT/pruning_speed.log" || status=1
exit $status
