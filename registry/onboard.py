"""Existing MCP servers onboarded by name: `pypi:NAME[==VERSION]` becomes a published version.

The package's wheel is downloaded by pip, run with the sandbox's interpreter (a wheel for its
Python and platform; wheels only: no sdist's build code runs here). Its `server.json` is the one
the package ships, if it does (in the wheel or at the root of its sdist: `registry.onboard_manifest`),
else one generated for it: the name `io.pypi/<name>` (or one the caller gives), the package's summary,
its one console script (or the one named like the package, or the one the caller names). Then
it is published like any upload (`Registry.publish`): its dependencies resolved into a layer,
a trial in a sandbox that lists its tools, the scans; and it waits for an admin's approval.

npm packages: `registry.onboard_npm` (`npm:NAME[@VERSION]`), run with the sandboxes' Node.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from registry.artifacts import ArtifactError, wheel_metadata
from registry.manifest import FLEET_META_KEY
from registry.onboard_manifest import GENERATED, OnboardError, SdistUnavailable, adopt, in_sdist, in_wheel, shipped_command
from sandbox.runtime import PythonRuntime

PYPI_NAMESPACE = "io.pypi"
DOWNLOAD_TIMEOUT = 300.0
MAX_DESCRIPTION = 100
"""The official registry's limit on a server's description."""
SERVER_JSON_SCHEMA = "https://static.modelcontextprotocol.io/schemas/2025-10-17/server.schema.json"


@dataclass(frozen=True)
class Onboarded:
    manifest: dict[str, Any]
    wheel: bytes
    manifest_source: str = GENERATED
    """Where its server.json came from: the package's own (which file of which archive), or generated."""


def parse_source(source: str) -> Requirement:
    """`pypi:NAME` or `pypi:NAME==VERSION`, as a requirement."""
    kind, _, spec = source.partition(":")
    if kind != "pypi" or not spec:
        raise OnboardError(f"the source {source!r} must read pypi:NAME, pypi:NAME==VERSION, npm:NAME or npm:NAME@VERSION")
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        raise OnboardError(f"{spec!r} is not NAME or NAME==VERSION: {exc}") from None
    pinned = [s for s in requirement.specifier if s.operator == "=="]
    if requirement.url or requirement.extras or requirement.marker or len(requirement.specifier) != len(pinned) or len(pinned) > 1:
        raise OnboardError(f"{spec!r} must be NAME or NAME==VERSION (one exact version, no extras, URL or markers)")
    return requirement


def fetch_pypi(source: str, python: PythonRuntime, *, name: str | None = None, command: str | None = None) -> Onboarded:
    """The package's wheel and its server.json: the package's own (`registry.onboard_manifest`), or
    one generated when it ships none. Blocking (pip, the index): run it in a thread."""
    requirement = parse_source(source)
    with tempfile.TemporaryDirectory(prefix="mcpfleet-onboard-") as scratch:
        env = {**os.environ, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": scratch}
        argv = [str(python.executable), "-m", "pip", "download", "--quiet", "--no-input", "--no-deps", "--only-binary=:all:",
                "--dest", scratch, str(requirement)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, env=env, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise OnboardError(f"downloading {requirement} took over {DOWNLOAD_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "[notice]"))]
            raise OnboardError(f"{requirement} has no wheel pip can download for the sandbox's Python "
                               f"{python.version}: {' '.join(lines)[-600:]}")
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise OnboardError(f"pip downloaded {len(wheels)} wheels for {requirement}; expected one")
        try:
            metadata, scripts = wheel_metadata(wheels[0])
        except ArtifactError as exc:
            raise OnboardError(f"the wheel of {requirement} is refused: {exc}") from None
        data = wheels[0].read_bytes()
        package, version = str(metadata.get("Name") or ""), str(metadata.get("Version") or "")
        unread = ""
        try:
            shipped = in_wheel(wheels[0]) or in_sdist(package, version)
        except SdistUnavailable as exc:  # an index without the JSON API (a mirror, a proxy): generated, and said so
            shipped, unread = None, f" ({exc}: a server.json in it was not looked for)"
    if shipped is None:
        return Onboarded(manifest_for(metadata, scripts, name=name, command=command), data, GENERATED + unread)
    chosen = choose_script(package, version, scripts, command or shipped_command(shipped))
    return Onboarded(adopt(shipped, "pypi", package, version, chosen, name=name), data, f"taken from {shipped.where}")


def manifest_for(metadata: dict[str, Any], scripts: dict[str, str], *, name: str | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """A server.json for a package of the index: its one stdio console script."""
    package, version = str(metadata.get("Name") or ""), str(metadata.get("Version") or "")
    command = choose_script(package, version, scripts, command)
    server_name = name or f"{PYPI_NAMESPACE}/{re.sub(r'[^a-z0-9-]', '-', canonicalize_name(package))}"
    return server_json(server_name, str(metadata.get("Summary") or f"{package} from PyPI"), "pypi", package, version, command)


def choose_script(package: str, version: str, scripts: dict[str, str], command: str | None) -> str:
    """The console script to run: the one named, the only one, or the one named like the package."""
    if command is None:
        named = [s for s in scripts if canonicalize_name(s) == canonicalize_name(package)]
        if len(scripts) == 1:
            command = next(iter(scripts))
        elif len(named) == 1:
            command = named[0]
        else:
            found = ", ".join(sorted(scripts)) or "none"
            raise OnboardError(f"{package} {version} has no single console script to run as its server (it has: {found});"
                               " name one with --command")
    elif command not in scripts:
        raise OnboardError(f"{package} {version} has no console script {command!r} (it has: {', '.join(sorted(scripts)) or 'none'})")
    return command


def server_json(name: str, summary: str, registry_type: str, package: str, version: str, command: str) -> dict[str, Any]:
    """A generated server.json: one package on stdio, run by its `command` (console script or bin)."""
    return {
        "$schema": SERVER_JSON_SCHEMA,
        "name": name,
        "description": (summary.strip().splitlines() or [package])[0][:MAX_DESCRIPTION],
        "version": version,
        "packages": [{"registryType": registry_type, "identifier": package, "version": version, "transport": {"type": "stdio"}}],
        "_meta": {FLEET_META_KEY: {"command": command}},
    }
