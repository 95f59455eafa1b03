#!/usr/bin/env bash
# Set up the environment, then train a small HyperSpace model on generated data (CPU, about a
# minute) and predict at native spacing and at 2 mm. Results: demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m custom_networks.research.demo --output_dir demo_output "$@"
