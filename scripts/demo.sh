#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: SmolLM2-135M pruned by Wanda to 50% offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Local copies of WikiText-2 etc. are used when present (e.g. ../shared/data beside this checkout).
if [ -z "${WANDA_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export WANDA_DATA_DIR=$(cd ../shared/data && pwd); fi
exec wanda "$@"
