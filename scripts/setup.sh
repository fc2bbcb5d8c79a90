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
# System packages the slow tests use: PostgreSQL (the scale-out test's Prefect database, which fails
# without it) and Chromium (the MLflow UI test, which skips without it). Installed only as root and only
# (or in CI with passwordless sudo) and only when missing, so a developer's run stays fast and never prompts.
apt_missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  apt_missing+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
  apt_missing+=(chromium)
fi
if [ "${#apt_missing[@]}" -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ] && [ "${CI:-}" = true ] && sudo -n true >/dev/null 2>&1; then
    as_root=(sudo -n)  # a CI runner with passwordless sudo
  fi
  if { [ "$(id -u)" -eq 0 ] || [ "${#as_root[@]}" -gt 0 ]; } && command -v apt-get >/dev/null 2>&1; then
    { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}"; } >/dev/null 2>&1 \
      || echo "note: apt-get could not install ${apt_missing[*]}; the PostgreSQL scale-out test fails and the browser test skips without them"
  else
    echo "note: ${apt_missing[*]} missing (install as root: apt-get install ${apt_missing[*]}); the PostgreSQL scale-out test fails and the browser test skips without them"
  fi
fi
