"""An onboarded package's server.json: the package's own when it ships one, generated only when it does not.

A package that is also in the official MCP registry often ships the `server.json` it was
published there with: at the root of its PyPI sdist (or in its wheel: at the root, in its
.dist-info, or in a top-level package), or in its npm package. `registry add` takes that one,
read from the archive as stored (nothing is unpacked or built), checked against the package
(it must describe this package at this version: its `packages` entry for the registry and name,
and its versions, agree; else the add is refused, saying what disagrees) and validated as any
upload's. Only the entry for the package being run is kept (mcpfleet runs that one), and
mcpfleet's `_meta["io.mcpfleet"]` gets the console script (or bin) to start. Where it came from
is recorded with the version (its `manifest` validation check, `source`).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
from packaging.utils import canonicalize_name

from registry.artifacts import ArtifactError, check_wheel, stream_member
from registry.manifest import FLEET_META_KEY, MANIFEST_FILE, ManifestError, parse_manifest

PYPI_JSON = "https://pypi.org/pypi"
"""The index's JSON API, which names a release's sdist and its sha256."""
MAX_SERVER_JSON = 256 * 1024
MAX_SDIST_BYTES = 50 * 2**20
MAX_SDIST_UNPACKED = 256 * 2**20
"""What an sdist's members may come to while it is searched (a gzip bomb stops here)."""
GENERATED = "generated from the package's metadata"


class OnboardError(ValueError):
    """A package that cannot be onboarded; the message says why and what to do."""


class SdistUnavailable(OnboardError):
    """The index's JSON API or the sdist could not be fetched: the server.json is generated instead, saying so."""


@dataclass(frozen=True)
class Shipped:
    document: Any
    where: str
    """Which file of which archive, for the record and for a refusal."""


def in_wheel(wheel: Path) -> Shipped | None:
    """The wheel's server.json: at its root, in its .dist-info or in a top-level package."""
    try:
        listed = check_wheel(wheel)
    except ArtifactError as exc:
        raise OnboardError(f"the wheel is refused: {exc}") from None
    members = [m for m in listed if not m.is_dir() and m.filename.split("/")[-1] == MANIFEST_FILE
               and m.filename.count("/") <= 1 and ".data/" not in m.filename]
    if not members:
        return None
    members.sort(key=lambda m: (m.filename.count("/"), not m.filename.split("/")[0].endswith(".dist-info"), m.filename))
    member = members[0]
    if member.file_size > MAX_SERVER_JSON:
        raise OnboardError(f"the wheel's {member.filename} is over {MAX_SERVER_JSON} bytes")
    blocks: list[bytes] = []
    with zipfile.ZipFile(wheel) as archive:
        stream_member(archive, member, blocks.append)
    return Shipped(_json(b"".join(blocks), f"the wheel's {member.filename}"), f"the wheel's {member.filename}")


def in_sdist(name: str, version: str, *, index: str = PYPI_JSON, timeout: float = 60.0) -> Shipped | None:
    """The server.json at the root of the release's sdist, as the index's JSON API names it (its
    sha256 checked). None when there is no sdist or it has none; SdistUnavailable when it cannot be
    fetched; OnboardError when what it holds is refused."""
    project = f"{index.rstrip('/')}/{canonicalize_name(name)}"
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            api = f"{project}/{version}/json"
            answer = client.get(api)
            if answer.status_code == 404:  # a mirror without the per-release API: the project's, by version
                api = f"{project}/json"
                answer = client.get(api)
                if answer.status_code == 404:
                    return None
            answer.raise_for_status()
            described = answer.json()
            files = described.get("urls") if api.endswith(f"/{version}/json") else (described.get("releases") or {}).get(version)
            sdists = [u for u in files or [] if isinstance(u, dict) and u.get("packagetype") == "sdist"
                      and str(u.get("filename", "")).endswith(".tar.gz")]
            if not sdists:
                return None
            sdist = sdists[0]
            if int(sdist.get("size") or 0) > MAX_SDIST_BYTES:
                raise SdistUnavailable(f"its sdist is over {MAX_SDIST_BYTES} bytes")
            data = client.get(urljoin(api, sdist["url"])).raise_for_status().content
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise SdistUnavailable(f"its sdist could not be fetched from {index}: {exc}") from None
    if len(data) > MAX_SDIST_BYTES or hashlib.sha256(data).hexdigest() != (sdist.get("digests") or {}).get("sha256"):
        raise OnboardError(f"{name} {version}'s sdist does not match the sha256 the index gives; refused")
    where = f"the sdist {sdist['filename']}"
    try:
        with tarfile.open(fileobj=_Bounded(gzip.GzipFile(fileobj=io.BytesIO(data))), mode="r|") as archive:
            for member in archive:
                parts = member.name.strip("/").split("/")
                if len(parts) == 2 and parts[1] == MANIFEST_FILE and member.isfile():
                    if member.size > MAX_SERVER_JSON:
                        raise OnboardError(f"{where} has a {member.name} over {MAX_SERVER_JSON} bytes")
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    return Shipped(_json(extracted.read(), f"{where}'s {member.name}"), f"{where} ({member.name})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OnboardError(f"{where} cannot be read: {exc}") from None
    return None


def in_npm(package_dir: Path, package: str) -> Shipped | None:
    """The server.json at the root of the installed npm package."""
    path = package_dir / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return None
    if path.stat().st_size > MAX_SERVER_JSON:
        raise OnboardError(f"{package}'s {MANIFEST_FILE} is over {MAX_SERVER_JSON} bytes")
    return Shipped(_json(path.read_bytes(), f"{package}'s {MANIFEST_FILE}"), f"the npm package's {MANIFEST_FILE}")


class _Bounded(io.RawIOBase):
    """A reader that refuses to yield more than MAX_SDIST_UNPACKED bytes."""

    def __init__(self, inner: gzip.GzipFile):
        self.inner, self.seen = inner, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.seen += len(data)
        if self.seen > MAX_SDIST_UNPACKED:
            raise OSError(f"it unpacks to more than {MAX_SDIST_UNPACKED} bytes")
        buffer[: len(data)] = data
        return len(data)


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OnboardError(f"{where} is not valid JSON: {exc}") from None


def adopt(shipped: Shipped, registry_type: str, package: str, version: str, command: str, *,
          name: str | None = None) -> dict[str, Any]:
    """The package's server.json as the version's manifest: refused, saying why, unless it describes
    this package at this version and is valid; `name` (the caller's) replaces its name."""
    document = shipped.document
    where = shipped.where
    if not isinstance(document, dict):
        raise OnboardError(f"the server.json in {where} is not a JSON object")
    same = (lambda a: canonicalize_name(a) == canonicalize_name(package)) if registry_type == "pypi" else (lambda a: a == package)
    entries = [p for p in document.get("packages") or [] if isinstance(p, dict) and p.get("registryType") == registry_type
               and isinstance(p.get("identifier"), str) and same(p["identifier"])]
    if not entries:
        named = ", ".join(f"{p.get('registryType')}:{p.get('identifier')}" for p in document.get("packages") or [] if isinstance(p, dict))
        raise OnboardError(f"the server.json in {where} does not describe {registry_type}:{package} (it lists: {named or 'no package'}); "
                           "refused: a package's server.json must be its own")
    entry = copy.deepcopy(entries[0])
    problems = []
    if document.get("version") != version:
        problems.append(f"its version is {document.get('version')!r}, the package's {version!r}")
    if entry.get("version", version) != version:
        problems.append(f"its {registry_type} entry's version is {entry.get('version')!r}, the package's {version!r}")
    if problems:
        raise OnboardError(f"the server.json in {where} does not agree with {package} {version}: {'; '.join(problems)}; refused")
    manifest = copy.deepcopy(document)
    entry["version"] = version
    manifest["packages"] = [entry]
    manifest.pop("remotes", None)  # mcpfleet runs the package, never connects to a remote
    if name:
        manifest["name"] = name
    meta = manifest.get("_meta") if isinstance(manifest.get("_meta"), dict) else {}
    fleet = meta.get(FLEET_META_KEY) if isinstance(meta.get(FLEET_META_KEY), dict) else {}
    manifest["_meta"] = {**meta, FLEET_META_KEY: {**fleet, "command": command}}
    try:
        parse_manifest(manifest)
    except ManifestError as exc:
        raise OnboardError(f"the server.json in {where} is not valid: {'; '.join(exc.problems)}") from None
    return manifest


def shipped_command(shipped: Shipped | None) -> str | None:
    """The console script (or bin) the package's own server.json names in mcpfleet's block, if any."""
    if shipped is None or not isinstance(shipped.document, dict):
        return None
    meta = shipped.document.get("_meta")
    fleet = meta.get(FLEET_META_KEY) if isinstance(meta, dict) else None
    command = fleet.get("command") if isinstance(fleet, dict) else None
    return command if isinstance(command, str) else None

