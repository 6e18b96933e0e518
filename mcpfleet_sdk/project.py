"""A tool project on disk: where it is, its manifest, and how its server starts from the sources.

A tool project is a directory with the registry's `server.json` and a Python project
(`pyproject.toml`) whose console script runs the MCP server on stdio.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from registry.manifest import Manifest

MANIFEST = "server.json"
PROJECT_ENV = "MCPFLEET_PROJECT"


class ProjectError(RuntimeError):
    """The directory is not a usable tool project; the message says what to fix."""


def find_project(start: Path | None = None) -> Path | None:
    """`MCPFLEET_PROJECT` if set, else the nearest directory from `start` (default: cwd) upwards with a server.json."""
    named = os.environ.get(PROJECT_ENV)
    if named:
        return Path(named).resolve()
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / MANIFEST).is_file():
            return directory
    return None


def require_project(start: Path | None = None) -> Path:
    found = find_project(start)
    if found is None:
        raise ProjectError(
            f"no tool project here: no {MANIFEST} in {(start or Path.cwd()).resolve()} or above "
            f"(set {PROJECT_ENV} to the project's directory)"
        )
    return found


def load(project: Path) -> Manifest:
    """The project's manifest, validated as the registry validates it (raises registry.manifest.ManifestError)."""
    # Imported here: the SDK is importable inside sandboxes, where the registry is not.
    from registry.manifest import load_manifest

    if not (project / MANIFEST).is_file():
        raise ProjectError(f"{project} has no {MANIFEST}")
    return load_manifest(project)


def load_or_report(project: Path, err: TextIO) -> Manifest | None:
    """The manifest, or None after telling the developer on `err` every problem found (for commands)."""
    from registry.manifest import ManifestError

    try:
        return load(project)
    except ManifestError as exc:
        print("\n".join([f"mcpfleet: {project}/server.json is not valid:", *(f"  - {p}" for p in exc.problems)]), file=err)
    except ProjectError as exc:
        print(f"mcpfleet: {exc}", file=err)
    return None


@dataclass(frozen=True)
class EntryPoint:
    """A console script's target, `module:attr`, and the directory its module is imported from."""

    module: str
    attr: str
    source_root: Path

    def code(self) -> str:
        """`python -c` code that calls it as the console script would (its return value is the exit status)."""
        head, _, rest = self.attr.partition(".")
        call = f"{head}{'.' + rest if rest else ''}()"
        return f"import sys; from {self.module} import {head}; sys.exit({call})"


def console_script(project: Path, command: str) -> EntryPoint:
    """Where `[project.scripts]` of pyproject.toml points `command`, found among the sources."""
    pyproject = project / "pyproject.toml"
    if not pyproject.is_file():
        raise ProjectError(f"{project} has no pyproject.toml")
    try:
        scripts = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"{pyproject} is not valid TOML: {exc}") from None
    target = scripts.get(command)
    if not isinstance(target, str):
        raise ProjectError(
            f"pyproject.toml has no console script {command!r} under [project.scripts] "
            f"(the server.json package's identifier, or _meta[\"io.mcpfleet\"][\"command\"], names it)"
        )
    module, _, attr = target.partition(":")
    module, attr = module.strip(), attr.strip()
    if not module or not attr:
        raise ProjectError(f"console script {command!r} = {target!r} is not of the form module:function")
    top = module.split(".", 1)[0]
    # The two layouts in use: the package next to pyproject.toml, or under src/.
    for root in (project, project / "src"):
        if (root / top).is_dir() or (root / f"{top}.py").is_file():
            return EntryPoint(module, attr, root)
    raise ProjectError(f"console script {command!r} imports {top!r}, which is neither in {project} nor in {project / 'src'}")
