#!/usr/bin/env bash
# Set up, then run the test suite (tests that need ../shared/data skip visibly without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
