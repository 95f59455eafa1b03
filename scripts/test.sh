#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest "$@"
