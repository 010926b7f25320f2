#!/usr/bin/env bash
# Set up stepq on a fresh machine: a virtual environment in .venv with torch (the CPU build that
# lies on this machine's disk, installed first so no dependency pulls a multi-GB CUDA build), then
# stepq in editable mode with the development extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install torch==2.13.0
fi
"${PIP[@]}" install -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
