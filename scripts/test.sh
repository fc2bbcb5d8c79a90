#!/usr/bin/env bash
# Set up and run the test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test-system-packages.sh
export HF_HUB_OFFLINE=1 CSD_ASSET_CACHE="${CSD_ASSET_CACHE:-$PWD/.cache/csd-asset}"
exec .venv/bin/python -m pytest -q "$@"
