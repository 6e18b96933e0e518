"""Building a tool project's wheel, as the registry will receive it.

pip builds it with the project's own build backend (PEP 517, in an isolated environment:
only the backend comes from the package index, and no dependency of the project is
fetched), so what is published is what `pip wheel` would make anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, canonicalize_version, parse_wheel_filename

BUILD_TIMEOUT_S = 600


class BuildError(RuntimeError):
    """The wheel could not be built, or is not the package server.json names; the message says why."""


def build_wheel(project: Path, out_dir: Path) -> Path:
    """Build `project`'s wheel into `out_dir` (which should be empty) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
        "--wheel-dir", str(out_dir), str(project),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env={**os.environ, "PIP_NO_INPUT": "1"}
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"building the wheel of {project} took longer than {BUILD_TIMEOUT_S} s") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise BuildError(f"building the wheel of {project} failed:\n{output[-4000:]}")
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one wheel from {project}, found {[w.name for w in wheels]}")
    return wheels[0]


def check_wheel(wheel: Path, identifier: str, version: str) -> None:
    """The wheel must be the package server.json names (`packages[0].identifier` and `.version`)."""
    try:
        name, wheel_version, _, _ = parse_wheel_filename(wheel.name)
    except InvalidWheelFilename as exc:
        raise BuildError(f"{wheel.name} is not a wheel's file name: {exc}") from None
    if name != canonicalize_name(identifier):
        raise BuildError(
            f"the wheel is {name!r} but server.json's package identifier is {identifier!r}: "
            f"make [project] name in pyproject.toml and the identifier agree"
        )
    if canonicalize_version(wheel_version) != canonicalize_version(version):
        raise BuildError(
            f"the wheel is version {wheel_version} but server.json's package says {version}: "
            f"make [project] version in pyproject.toml and server.json agree"
        )
