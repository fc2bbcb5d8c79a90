#!/usr/bin/env bash
# Set up and run the main job: catalogs/demo.csv end to end on the toy prior, on CPU.
# Prints where the GLBs and the MLflow database are, and how to open the MLflow UI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/csd-asset doctor
exec .venv/bin/csd-asset run catalogs/demo.csv --out out/demo --parallel 2 "$@"
