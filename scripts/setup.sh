#!/usr/bin/env bash
# Create (or reuse) .venv in the repository and install csd-asset with its test extras.
# torch is pinned first so pip never pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${CSD_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
# The Khronos glTF validator (npm) lets the tests check exported GLBs; optional where npm is absent.
if command -v npm >/dev/null 2>&1 && [ ! -d .cache/node/node_modules/gltf-validator ]; then
  npm install --silent --no-audit --no-fund --prefix .cache/node gltf-validator@2.0.0-dev.3.10 >/dev/null 2>&1 \
    || echo "note: gltf-validator could not be installed; the GLB validator test will skip"
fi
