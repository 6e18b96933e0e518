"""A pod's published servers: fetched by digest from the gateway and unpacked, before the supervisor starts.

Locally the gateway links each install into the sandbox's tools dir (`ArtifactStore.link_into`). A
Kubernetes pod has no such dir on a host: the operator gives it an init container (the gateway's
image, which has this module) that runs

    python -m registry.fetch --gateway URL --sandbox NAMESPACE/NAME --token-file PATH --into /opt/tools \
        [--layer LAYER=WHEEL,WHEEL...]... SHA256...

and writes each wheel, installed as `ArtifactStore.install` does, to `<into>/<sha256>`: the path the
servers' command lines name (`registry.artifacts.server_spec`). A server's dependency layer
(`registry.dependencies`) is fetched the same way, wheel by wheel, and unpacked into one directory,
`<into>/<layer>`, as `ArtifactStore.install_layer` does. The layer's own digest is the gateway's to
check (it hashes names and versions, which the init container is not given); each of its wheels is
checked here against its digest like any other. The volume is an emptyDir that the
supervisor's container mounts read-only.

The gateway answers `GET /registry/v1/artifacts/<sha256>` to a caller that proves to be the sandbox
(`Authorization: Bearer <its token>`, `Mcpfleet-Sandbox: <namespace>/<name>`) and only for a digest in
that sandbox's own spec.servers. Whatever it answers, a wheel whose bytes do not hash to the digest
asked for is refused here, so neither the network nor the store can change what runs; and the
installer's limits (`check_wheel`) hold against a wheel that would unpack to too much.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from registry.artifacts import ArtifactError, install_wheel

SANDBOX_HEADER = "Mcpfleet-Sandbox"
MAX_WHEEL_BYTES = 64 * 2**20
"""What one download may be (the registry's own publish limit is lower)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(RuntimeError):
    """A wheel that could not be fetched or installed; the message says which and why."""


def artifact_url(gateway: str, sha256: str) -> str:
    return f"{gateway.rstrip('/')}/registry/v1/artifacts/{sha256}"


def fetch_into(gateway: str, sandbox: str, token: str, into: Path, digests: Sequence[str], *, timeout: float = 60.0,
               layers: dict[str, list[str]] | None = None) -> list[Path]:
    """Each wheel by its digest, checked and installed at `into/<digest>` (one already there is kept:
    a restarted init container does not fetch again), and each layer's wheels into `into/<layer>`.
    Returns the install dirs."""
    layers = layers or {}
    bad = [d for d in [*digests, *layers, *(w for wheels in layers.values() for w in wheels)] if not _SHA256.match(d)]
    if bad:
        raise FetchError(f"not sha256 digests: {bad}")
    into.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {token}", SANDBOX_HEADER: sandbox}
    installed = []
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for sha256 in dict.fromkeys(digests):
            target = into / sha256
            if not target.is_dir():
                _install(client, artifact_url(gateway, sha256), sha256, target)
            installed.append(target)
        for layer, wheels in layers.items():
            target = into / layer
            if not target.is_dir():
                staging = into / f".{layer}.partial"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                for sha256 in wheels:
                    _install(client, artifact_url(gateway, sha256), sha256, staging, merge=True)
                staging.rename(target)
            installed.append(target)
    return installed


def _install(client: httpx.Client, url: str, sha256: str, target: Path, *, merge: bool = False) -> None:
    """The wheel at `url`, checked against `sha256`, installed at `target` (`merge`: into it, a layer)."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{sha256}.", suffix=".whl") as wheel:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise FetchError(f"the gateway answered {response.status_code} for {sha256}")
            size = 0
            for block in response.iter_bytes():
                size += len(block)
                if size > MAX_WHEEL_BYTES:
                    raise FetchError(f"the wheel {sha256} is over {MAX_WHEEL_BYTES} bytes")
                digest.update(block)
                wheel.write(block)
        wheel.flush()
        if digest.hexdigest() != sha256:
            raise FetchError(f"what came for {sha256} hashes to {digest.hexdigest()}; refusing it")
        staging = target if merge else target.parent / f".{sha256}.partial"
        if not merge:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            install_wheel(Path(wheel.name), staging, merge=merge)
        except ArtifactError as exc:
            raise FetchError(f"the wheel {sha256} cannot be installed: {exc}") from None
    if not merge:
        staging.rename(target)  # a half-done install is never seen under the digest


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m registry.fetch", description=__doc__.split("\n")[0])
    parser.add_argument("--gateway", required=True, help="the gateway's URL, as the pod reaches it")
    parser.add_argument("--sandbox", required=True, help="NAMESPACE/NAME of the McpSandbox")
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--into", required=True, type=Path)
    parser.add_argument("--layer", action="append", default=[], metavar="LAYER=WHEEL,...",
                        help="a dependency layer's digest and the digests of its wheels (repeatable)")
    parser.add_argument("digests", nargs="*")
    args = parser.parse_args(argv)
    layers = {}
    for given in args.layer:
        layer, _, wheels = given.partition("=")
        layers[layer] = [w for w in wheels.split(",") if w]
    try:
        token = args.token_file.read_text().strip()
        for path in fetch_into(args.gateway, args.sandbox, token, args.into, args.digests, layers=layers):
            print(f"installed {path}", file=sys.stderr)
    except (FetchError, OSError, httpx.HTTPError) as exc:
        print(f"registry.fetch: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
