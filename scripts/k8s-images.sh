#!/usr/bin/env bash
# Builds the fleet's three images for Kubernetes (k8s/images/*.Dockerfile), tagged TAG (default `dev`):
#   scripts/k8s-images.sh [TAG | --base-only]
#   mcpfleet-gateway:TAG  mcpfleet-operator:TAG  mcpfleet-sandbox:TAG
# Nothing is pulled from an image registry: the base, mcpfleet-base:local, is this machine's own Debian
# Python (python3, venv, CA certificates and what they depend on, from dpkg's file lists), imported with
# `docker import`. Python packages come from the package index during the build.
# Then `kind load docker-image mcpfleet-{gateway,operator,sandbox}:dev` puts them on a kind cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
# `--base-only` makes the base when missing and stops there (the Tiltfile builds the rest).
TAG=${1:-dev}
BASE=${MCPFLEET_BASE_IMAGE:-mcpfleet-base:local}

python=$(readlink -f /usr/bin/python3)   # e.g. /usr/bin/python3.11: Debian's, not a pyenv one
# libstdc++6: for Node (servers added from npm, in the sandbox image); tini: the sandbox pod's PID 1.
roots=(dash coreutils ca-certificates libstdc++6 tini "$(dpkg -S "$python" | cut -d: -f1)" "$(basename "$python")-venv" python3-venv)
# A base made from other roots (an older version of this script) is made again.
if [ "$(docker image inspect -f '{{ index .Config.Labels "mcpfleet.roots" }}' "$BASE" 2>/dev/null)" != "${roots[*]}" ]; then
  # Every installed package those need, without recommends: the image's whole userland.
  mapfile -t packages < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "${roots[@]}" | grep -v '^ ' | sort -u \
    | xargs dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 2>/dev/null | awk '$1 == "ii" {print $2}')
  echo "k8s-images: making $BASE from ${#packages[@]} installed Debian packages"
  files=$(mktemp); trap 'rm -f "$files"' EXIT
  # Merged /usr: /bin, /lib... are symlinks into /usr, so take each file by its /usr path.
  dpkg-query -L "${packages[@]}" | sed -E 's#^/(bin|sbin|lib|lib64)/#/usr/\1/#' | sort -u \
    | while read -r f; do if [ -f "$f" ] || [ -L "$f" ]; then echo "${f#/}"; fi; done > "$files"
  printf '%s\n' bin sbin lib lib64 etc/ssl/certs/ca-certificates.crt etc/passwd etc/group >> "$files"
  # Once each: a name listed twice goes into the archive as a hard link to itself, which import refuses.
  sort -u -o "$files" "$files"
  tar -C / --no-recursion -cf - -T "$files" 2>/dev/null | docker import -c 'ENV PATH=/usr/bin:/bin' -c "LABEL mcpfleet.roots=\"${roots[*]}\"" - "$BASE"
fi

[ "$TAG" = --base-only ] && exit 0

for image in gateway operator sandbox; do
  echo "k8s-images: mcpfleet-$image:$TAG"
  docker build -q --build-arg BASE="$BASE" -f "k8s/images/$image.Dockerfile" -t "mcpfleet-$image:$TAG" .
done
