#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install the pinned requirements, CPU build of torch first.
# Re-running is cheap: nothing is reinstalled while requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
stamp=".venv/.installed-$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, from its own pin: a package that asks for "torch" later then finds it satisfied and
# pip does not fetch a CUDA build of several GB
.venv/bin/python -m pip install -q "$(grep -E '^torch==' requirements.txt)"
# --no-build-isolation: a source build (MONAI Label's sam2) would otherwise pull a CUDA torch
.venv/bin/python -m pip install -q --no-build-isolation -r requirements.txt
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
rm -f .venv/.installed-*
touch "$stamp"
