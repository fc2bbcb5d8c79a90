#!/usr/bin/env bash
# Set up and run the main job: the demo catalog end to end on the toy prior, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/csd-asset doctor
