"""A tool's own dependencies: resolved at publish, kept as wheels, unpacked into one read-only layer.

At publish the registry asks pip, run by the sandbox's own interpreter (so markers, Python version
and platform tags are those of the place the tool runs), what the wheel's `Requires-Dist` needs
beyond what the sandbox runtime already has (`pip install --dry-run --report`, wheels only: no
sdist's build code ever runs here). Each wheel of the answer is downloaded from the index pip
named, checked against the sha256 pip recorded and against the wheel limits (`check_wheel`),
and kept in the artifact store under its digest like a published wheel. The resolved set (the
*lock*: name, version, sha256 of each wheel) has a digest of its own, the *layer digest*: the
layer is `<home>/registry/installed/<layer digest>/`, every wheel of the lock unpacked into one
directory, linked read-only into each sandbox that runs the version and put on that server's
path after its own install (`registry.artifacts.server_spec`). Nothing is fetched at run time.

An approval records the layer digest of the version it approves; a gateway refuses to run a
version whose layer is not the one approved (`Registry._published_spec`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from registry.artifacts import ArtifactError, verify_wheel
from sandbox.runtime import PythonRuntime

NOT_RESOLVED = frozenset({"mcpfleet", "mcpfleet-sdk"})
"""Provided in every sandbox by the product itself, and not what an index's package of that name is."""
MAX_PACKAGES = 64
"""Wheels in one layer."""
MAX_DEPENDENCY_BYTES = 50 * 2**20
"""One dependency's wheel, as downloaded (the publish limit on a tool's own wheel)."""
MAX_LAYER_BYTES = 200 * 2**20
"""All of a layer's wheels, as downloaded."""
RESOLVE_TIMEOUT = 300.0


class DependencyError(ValueError):
    """Dependencies that cannot be resolved, fetched or kept; the message says which and why."""


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    sha256: str
    bytes: int
    url: str


def layer_digest(lock: list[dict[str, Any]]) -> str:
    """The digest of a resolved set: of its (name, version, sha256) triples, sorted by name. Since
    each wheel is kept and checked by its own sha256, this names what the layer holds."""
    canonical = sorted((canonicalize_name(p["name"]), p["version"], p["sha256"]) for p in lock)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def requirements_to_resolve(requires: list[str]) -> list[str]:
    """The wheel's `Requires-Dist` lines pip is to resolve: not the product's own packages. An
    unparseable line is refused here, by name."""
    kept = []
    for line in requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise DependencyError(f"the wheel's requirement {line!r} is not valid: {exc}") from None
        if requirement.url:
            raise DependencyError(f"the wheel requires {line!r} from a URL; only packages from the index are resolved")
        if canonicalize_name(requirement.name) not in NOT_RESOLVED:
            kept.append(str(requirement))  # re-written: never a line of the publisher's in pip's requirements file
    return kept


def resolve(requires: list[str], python: PythonRuntime, *, timeout: float = RESOLVE_TIMEOUT) -> list[dict[str, Any]]:
    """What pip would install for `requires` into the sandbox runtime (what it has already and
    satisfies is not listed), as [{name, version, url, sha256}]. DependencyError with pip's own
    words when it cannot."""
    if not requires:
        return []
    with tempfile.TemporaryDirectory(prefix="mcpfleet-resolve-") as scratch:
        listed = Path(scratch) / "requirements.txt"
        listed.write_text("\n".join(requires) + "\n")
        report = Path(scratch) / "report.json"
        env = {
            **os.environ,
            # The runtime's own site-packages, as the sandbox has it on its path: what is there and
            # satisfies a requirement is not installed again.
            "PYTHONPATH": os.pathsep.join(str(p) for p in python.site_packages),
            "PYTHONNOUSERSITE": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "HOME": scratch,
        }
        argv = [str(python.executable), "-m", "pip", "install", "--dry-run", "--quiet", "--no-input", "--only-binary=:all:",
                "--report", str(report), "-r", str(listed)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise DependencyError(f"resolving the dependencies took over {timeout:.0f} s") from None
        except OSError as exc:
            raise DependencyError(f"pip could not be run with the sandbox's Python ({python.executable}): {exc}") from None
        if done.returncode != 0:
            raise DependencyError(f"pip cannot resolve {', '.join(requires)} for the sandbox's Python {python.version}: "
                                  f"{_pip_error(done.stderr)} (only wheels are taken: a package published only as source cannot be)")
        answer = json.loads(report.read_text())
    found = []
    for item in answer.get("install") or []:
        info = item.get("download_info") or {}
        sha256 = ((info.get("archive_info") or {}).get("hashes") or {}).get("sha256")
        url = info.get("url") or ""
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if not sha256 or not url.split("#", 1)[0].endswith(".whl"):
            raise DependencyError(f"{name} {version} comes without a wheel and its sha256 ({url}); only wheels are taken")
        found.append({"name": name, "version": version, "url": url, "sha256": sha256})
    if len(found) > MAX_PACKAGES:
        raise DependencyError(f"the dependencies come to {len(found)} packages; at most {MAX_PACKAGES} are taken")
    return found


def _pip_error(stderr: str) -> str:
    """pip's error lines, without its warnings and hints, in one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "hint:", "[notice]"))]
    return " ".join(lines)[-800:] or "no reason given"


def fetch(resolved: list[dict[str, Any]], keep: Any, *, timeout: float = 120.0) -> list[Locked]:
    """Download each resolved wheel, check its sha256 and the wheel limits, and `keep(bytes)` it
    (the artifact store's `store`). Returns the lock."""
    lock: list[Locked] = []
    total = 0
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for item in resolved:
            data = _download(client, item["url"], item["name"])
            total += len(data)
            if total > MAX_LAYER_BYTES:
                raise DependencyError(f"the dependencies come to more than {MAX_LAYER_BYTES} bytes of wheels")
            if hashlib.sha256(data).hexdigest() != item["sha256"]:
                raise DependencyError(f"{item['name']} {item['version']} does not match the sha256 the index gave; refused")
            try:
                verify_wheel(data)
            except ArtifactError as exc:
                raise DependencyError(f"{item['name']} {item['version']} is refused: {exc}") from None
            keep(data)
            lock.append(Locked(item["name"], item["version"], item["sha256"], len(data), item["url"].split("#", 1)[0]))
    return lock


def _download(client: httpx.Client, url: str, name: str) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme == "file":  # an index or find-links directory on this machine (pip's configuration)
        path = Path(unquote(parsed.path))
        if path.stat().st_size > MAX_DEPENDENCY_BYTES:
            raise DependencyError(f"{name}'s wheel is over {MAX_DEPENDENCY_BYTES} bytes")
        return path.read_bytes()
    if parsed.scheme not in ("https", "http"):
        raise DependencyError(f"{name} is offered from {url!r}; only http(s) and file URLs are fetched")
    blocks, size = [], 0
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DependencyError(f"{url} answered {response.status_code}")
            for block in response.iter_bytes():
                size += len(block)
                if size > MAX_DEPENDENCY_BYTES:
                    raise DependencyError(f"{name}'s wheel is over {MAX_DEPENDENCY_BYTES} bytes")
                blocks.append(block)
    except httpx.HTTPError as exc:
        raise DependencyError(f"{name} could not be downloaded from {url}: {exc}") from None
    return b"".join(blocks)


def dependency_check(requires: list[str], python: PythonRuntime, keep: Any) -> dict[str, Any]:
    """Validation's `dependencies` check: the resolved set (names, versions, hashes) and its layer
    digest, or why there is none. Blocking (pip and downloads): run it in a thread."""
    try:
        lock = fetch(resolve(requirements_to_resolve(requires), python), keep)
    except DependencyError as exc:
        return {"check": "dependencies", "ok": False, "detail": str(exc), "findings": [], "packages": [], "layer_sha256": None}
    packages = [asdict(p) for p in lock]
    if not packages:
        detail = "none beyond the sandbox runtime"
    else:
        listed = ", ".join(f"{p.name} {p.version}" for p in lock)
        detail = f"{len(lock)} package(s), {sum(p.bytes for p in lock)} bytes of wheels: {listed}"
    return {
        "check": "dependencies", "ok": True, "detail": detail, "findings": [], "packages": packages,
        "layer_sha256": layer_digest(packages) if packages else None,
    }
