#!/usr/bin/env bash
# Docker Engine with gVisor registered as the `runsc` runtime, for the Docker sandbox backend
# (sandbox/backends/docker.py): installs Debian's docker.io if need be, registers the runtime,
# starts dockerd when no daemon answers. Safe to run again; quiet when all is there.
set -euo pipefail

CONFIG=/etc/docker/daemon.json
LOG=/var/log/dockerd.log

if ! command -v dockerd >/dev/null 2>&1; then
  echo "docker: installing Debian's docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

runsc=$(command -v runsc) || { echo "docker: runsc is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
# Without systemd as init, Docker must manage cgroups itself.
if [ -d /run/systemd/system ]; then driver=; else driver=cgroupfs; fi

# Merged into whatever the file holds already. Sandboxes never have a network; --host-uds=open lets
# the supervisor connect to the gateway's socket in its channel dir; --overlay2=root:memory puts the
# root in memory, so that `df /` inside shows nothing of the host's disk (sandbox/bundle.py,
# ROOT_OVERLAY). Checkpoints (hibernation) are still an experimental API of the Engine.
mkdir -p "$(dirname "$CONFIG")"
changed=$(RUNSC="$runsc" DRIVER="$driver" CONFIG="$CONFIG" python3 - <<'PY'
import json, os
path = os.environ["CONFIG"]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
before = json.dumps(config, sort_keys=True)
config.setdefault("runtimes", {})["runsc"] = {
    "path": os.environ["RUNSC"],
    "runtimeArgs": ["--network=none", "--host-uds=open", "--overlay2=root:memory"],
}
config["experimental"] = True
if os.environ["DRIVER"]:
    options = [o for o in config.get("exec-opts", []) if not o.startswith("native.cgroupdriver=")]
    config["exec-opts"] = [*options, f"native.cgroupdriver={os.environ['DRIVER']}"]
if json.dumps(config, sort_keys=True) != before:
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("yes")
PY
)

ready() {
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' &&
    [ "$(docker version --format '{{.Server.Experimental}}' 2>/dev/null)" = true ]
}

if docker info >/dev/null 2>&1; then
  if [ -n "$changed" ]; then
    echo "docker: $CONFIG updated; asking dockerd to reload it"
    kill -HUP "$(cat /var/run/docker.pid)" || true
    sleep 1
  fi
  ready || { echo "docker: the running dockerd lacks the runsc runtime or experimental mode: restart it" >&2; exit 1; }
  exit 0
fi

echo "docker: starting dockerd (log: $LOG)"
setsid dockerd >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 60); do
  ready && exit 0
  sleep 0.5
done
echo "docker: dockerd did not come up; the end of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
