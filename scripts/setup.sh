#!/usr/bin/env bash
# Create .venv and install peftjax with its test extras (CPU). Idempotent.
# PyTorch (a test/benchmark extra) is installed first as the pinned CPU build; otherwise pip would
# resolve `torch` for transformers/peft to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "peftjax installed in .venv ($(.venv/bin/python --version))"
