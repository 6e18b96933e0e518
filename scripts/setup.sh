#!/usr/bin/env bash
# Installs whatever the fleet needs and is missing: Debian packages, the venvs, and with `test`, Node tooling.
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
# PID 1 of every sandbox is tini's static build (sandbox/bundle.py `INIT`), not a second Python.
[ -x /usr/bin/tini-static ] || need_apt+=(tini)
# Workspaces with a disk quota are ext4 images (sandbox/workspaces.py); without e2fsprogs they have none.
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
# The admin page's tests drive Debian's chromium with Playwright (tests/browser.py); no browser of Playwright's own.
if [ "${1:-}" = "test" ]; then command -v chromium >/dev/null 2>&1 || need_apt+=(chromium); fi
# The console's reference screenshots are rendered with fonts-dejavu-core's six files only (tests/screenshots/fonts.conf).
if [ "${1:-}" = "test" ]; then [ -e /usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf ] || need_apt+=(fonts-dejavu-core); fi
# The rate limits' tests share buckets through a private redis-server (tests/test_limits.py).
if [ "${1:-}" = "test" ]; then command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server); fi
# promtool checks the alert rules under k8s/monitoring (tests/test_telemetry.py); it comes with Debian's prometheus.
if [ "${1:-}" = "test" ]; then command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus); fi
# npm installs the sandboxes' Node and npm servers onboarded by name (`registry add npm:`); Node needs libstdc++.
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
[ -e /usr/lib/x86_64-linux-gnu/libstdc++.so.6 ] || [ -e /usr/lib/aarch64-linux-gnu/libstdc++.so.6 ] || need_apt+=(libstdc++6)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# gVisor 2024-07 beside Debian's runsc (sandbox/gvisor.py prefers it): its systrap platform costs about 2 µs
# per system call here against 70-90 µs for the old one's ptrace. It is bookworm-backports' version and
# trixie's own; the .deb is unpacked under /opt, never installed, so the system's runsc stays (the fallback,
# and what anything else on the machine runs). Pinned: a new version goes through the sandbox suites first.
# The upstream release is pinned; Debian's revision differs by suite (bookworm-backports: -4~bpo12+2).
GVISOR_RELEASE=0.0~20240729.0
GVISOR_DIR=/opt/mcpfleet/gvisor-20240729
gvisor_version() { apt-cache madison runsc | awk -v r="$GVISOR_RELEASE-" 'index($3, r) == 1 { print $3; exit }'; }
if [ ! -x "$GVISOR_DIR/usr/bin/runsc" ]; then
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # Backports are never installed unless asked for by name (their Release file says NotAutomatic).
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' 'Components: main' \
      'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > /etc/apt/sources.list.d/bookworm-backports.sources
    apt-get update -qq
  fi
  [ -n "$(gvisor_version)" ] || apt-get update -qq
  version=$(gvisor_version)
  if [ -n "$version" ]; then
    echo "setup: unpacking runsc $version into $GVISOR_DIR"
    download=$(mktemp -d) && chmod 755 "$download"  # apt-get download writes as _apt
    (cd "$download" && apt-get download -qq "runsc=$version")
    rm -rf "$GVISOR_DIR.tmp" && mkdir -p "$GVISOR_DIR.tmp" && dpkg-deb -x "$download"/runsc_*.deb "$GVISOR_DIR.tmp"
    rm -rf "$download" "$GVISOR_DIR" && mv "$GVISOR_DIR.tmp" "$GVISOR_DIR"
  else
    echo "setup: no apt source here has runsc $GVISOR_RELEASE: sandboxes run the system's runsc"
  fi
fi

# Docker Engine with the runsc runtime, for the Docker sandbox backend and its tests.
if [ "${1:-}" = "test" ] || [ "${MCPFLEET_SANDBOX_BACKEND:-}" = "docker" ]; then
  scripts/docker.sh
fi

# The venv is rebuilt only when pyproject.toml changes.
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMPS/venv" 2>/dev/null)" != "$want" ]; then
  echo "setup: preparing .venv"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[all,test]'
  echo "$want" > "$STAMPS/venv"
fi

# The sandboxes' own Python (sandbox/runtime.py): the newest 3.12 or later on the machine, with only what
# the code inside imports (the mcp SDK, pinned as in pyproject.toml). Under gVisor every syscall is costly,
# and 3.11's asyncio makes one per get_running_loop(). Without such a Python, sandboxes run .venv's.
sandbox_python=
for minor in 14 13 12; do
  for candidate in "python3.$minor" $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3."$minor"*/bin/python3."$minor" 2>/dev/null | sort -rV); do
    # pyenv's shims exist for versions that are not selected, and fail when run: try each one.
    if "$candidate" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      sandbox_python=$("$candidate" -c 'import os, sys; print(os.path.realpath(sys.executable))')
      break 2
    fi
  done
done
if [ -n "$sandbox_python" ]; then
  want=$( (cat pyproject.toml; "$sandbox_python" -VV; echo "$sandbox_python") | sha256sum | cut -c1-16)
  if [ ! -x .venv-sandbox/bin/python ] || [ "$(cat "$STAMPS/venv-sandbox" 2>/dev/null)" != "$want" ]; then
    echo "setup: preparing .venv-sandbox ($("$sandbox_python" -V))"
    rm -rf .venv-sandbox
    "$sandbox_python" -m venv .venv-sandbox
    mcp=$(.venv-sandbox/bin/python - <<'PY'
import re, tomllib
dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in dependencies if re.match(r"mcp\s*([\[=<>!~;]|$)", d)))
PY
)
    .venv-sandbox/bin/pip install -q --disable-pip-version-check "$mcp"
    echo "$want" > "$STAMPS/venv-sandbox"
  fi
elif [ -e .venv-sandbox ]; then
  echo "setup: no Python 3.12 or later any more: sandboxes run .venv's Python"
  rm -rf .venv-sandbox "$STAMPS/venv-sandbox"
fi

# The sandboxes' Node runtime (npm servers onboarded with `registry add npm:...`), bound read-only into each
# sandbox at /opt/mcpfleet/node: a pinned Node 22 from npm's per-platform package (a plain binary; no install
# script runs), whatever Node the host has or lacks (Debian 12's is 18; its npm, installed above, only fetches).
NODE_VERSION=22.23.3
case "$(uname -m)" in x86_64) node_arch=x64 ;; aarch64) node_arch=arm64 ;; *) node_arch="" ;; esac
if [ -n "$node_arch" ] && [ "$(cat /opt/mcpfleet/node/version 2>/dev/null)" != "$NODE_VERSION-$node_arch" ]; then
  echo "setup: installing Node $NODE_VERSION for sandboxes in /opt/mcpfleet/node"
  rm -rf /opt/mcpfleet/node.partial && mkdir -p /opt/mcpfleet/node.partial/bin
  npm install --prefix /opt/mcpfleet/node.partial --ignore-scripts --no-audit --no-fund --no-save --loglevel=error \
    "node-linux-$node_arch@$NODE_VERSION"
  ln -s "../node_modules/node-linux-$node_arch/bin/node" /opt/mcpfleet/node.partial/bin/node
  /opt/mcpfleet/node.partial/bin/node --version >/dev/null
  echo "$NODE_VERSION-$node_arch" > /opt/mcpfleet/node.partial/version
  rm -rf /opt/mcpfleet/node && mv /opt/mcpfleet/node.partial /opt/mcpfleet/node
fi

# Node tooling for the test suite only: the conformance suite (with its own Node 22) and the MCP Inspector.
if [ "${1:-}" = "test" ] && [ -f tests/conformance/package-lock.json ]; then
  want=$(sha256sum tests/conformance/package-lock.json | cut -c1-16)
  if [ ! -d tests/conformance/node_modules ] || [ "$(cat "$STAMPS/conformance" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the conformance suite"
    npm ci --prefix tests/conformance --no-audit --no-fund --loglevel=error
    echo "$want" > "$STAMPS/conformance"
  fi
fi

# The local model (scripts/models.sh): llama-server compiled once per machine (15-30 min) and Gemma 3 270M.
# `test` waits for it (its tests ask the real server); `run` never does: it goes on in the background and
# the fleet serves at once, its local model `building` until then (`mcpfleet models list`).
if [ "${1:-}" = "test" ]; then
  scripts/models.sh
elif [ "${1:-}" = "run" ] && [ "${MCPFLEET_LOCAL_MODEL:-auto}" != "off" ]; then
  mkdir -p /opt/mcpfleet
  echo "setup: preparing the local model in the background (log: /opt/mcpfleet/models.log)"
  # Its own session: stopping `make run` with Ctrl-C does not stop a build that another run would redo.
  setsid nohup scripts/models.sh >>/opt/mcpfleet/models.log 2>&1 </dev/null &
fi
