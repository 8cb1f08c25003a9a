#!/usr/bin/env bash
# Set up, train per-task LoRA adapters on the shipped frozen base, and evaluate against the base.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-runs/quickstart}
.venv/bin/peftjax train --config configs/quickstart.py --workdir "$WORKDIR" "$@"
.venv/bin/peftjax eval --config configs/quickstart.py --workdir "$WORKDIR" "$@"
