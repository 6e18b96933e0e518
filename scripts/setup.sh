#!/usr/bin/env bash
# Installs whatever the fleet needs and is missing: Debian packages, the venv, Node tooling.
# Safe to run again; each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

STAMPS=.setup
mkdir -p "$STAMPS"
PYTHON=${PYTHON:-python3}

need_apt=()
command -v runsc >/dev/null 2>&1 || need_apt+=(runsc)
# Sandboxes take `ls` and `stat` from busybox: this runsc refuses coreutils' statx (sandbox/bundle.py).
command -v busybox >/dev/null 2>&1 || need_apt+=(busybox)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The venv is rebuilt only when pyproject.toml changes.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMPS/venv" 2>/dev/null)" != "$want" ]; then
  echo "setup: preparing .venv"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" > "$STAMPS/venv"
fi

# Node tooling for the protocol conformance suite (its own Node 22, from the npm registry).
if [ -f tests/conformance/package-lock.json ]; then
  want=$(sha256sum tests/conformance/package-lock.json | cut -c1-16)
  if [ ! -d tests/conformance/node_modules ] || [ "$(cat "$STAMPS/conformance" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the conformance suite"
    npm ci --prefix tests/conformance --no-audit --no-fund --loglevel=error
    echo "$want" > "$STAMPS/conformance"
  fi
fi
