#!/usr/bin/env bash
# System packages only the slow tests use (scripts/test.sh calls this; the demo does not need them).
set -euo pipefail
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
