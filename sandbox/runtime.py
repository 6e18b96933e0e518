"""The Python a sandbox runs: an interpreter's installation and its environment's site-packages.

By default the gateway's own interpreter. A venv of its own may be used instead
(scripts/setup.sh builds `.venv-sandbox` from Python 3.12 or newer when the
machine has one): under gVisor's ptrace platform every syscall is costly, and
3.11's asyncio makes a getpid() on each get_running_loop(), which 3.12 no longer
does (the workspace server's read_file: 54 syscalls per call on 3.11, 26 on 3.13).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

_DESCRIBE = """
import json, sys, sysconfig
paths = sysconfig.get_paths()
print(json.dumps({"prefix": sys.base_prefix, "executable": sys.executable,
                  "site": [paths["purelib"], paths["platlib"]], "version": sys.version.split()[0]}))
"""
"""Run by a venv's interpreter: what `current_python()` reads in-process."""


@dataclass(frozen=True)
class PythonRuntime:
    prefix: Path
    """The interpreter's installation (sys.base_prefix), bound at the same path (its rpath points there)."""
    executable: Path
    site_packages: tuple[Path, ...]
    """The environment's own site-packages, if it is a venv: bound under /opt/mcpfleet/site-packages."""
    version: str


def current_python() -> PythonRuntime:
    paths = sysconfig.get_paths()
    return _runtime(sys.base_prefix, sys.executable, [paths["purelib"], paths["platlib"]], sys.version.split()[0])


def venv_python(venv: Path | str) -> PythonRuntime:
    """The runtime of the venv at `venv`, as its own interpreter reports it."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise RuntimeError(f"{venv} is not a venv: it has no bin/python")
    try:
        # -I: neither the gateway's PYTHONPATH nor the user's site-packages may leak into the answer.
        done = subprocess.run(
            [str(python), "-I", "-c", _DESCRIBE], capture_output=True, text=True, timeout=30, check=True
        )
        facts = json.loads(done.stdout)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{python} failed ({exc.returncode}): {exc.stderr.strip()[-500:]}") from None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise RuntimeError(f"{python} did not describe itself: {exc}") from None
    return _runtime(facts["prefix"], facts["executable"], facts["site"], facts["version"])


def _runtime(prefix: str, executable: str, site: list[str], version: str) -> PythonRuntime:
    base = Path(prefix).resolve()
    site_packages: list[Path] = []
    for entry in site:
        path = Path(entry).resolve()
        # The installation's own site-packages comes with its prefix; only a venv's needs binding.
        if path.is_dir() and path not in site_packages and not path.is_relative_to(base):
            site_packages.append(path)
    return PythonRuntime(
        prefix=base,
        executable=Path(os.path.realpath(executable)),
        site_packages=tuple(site_packages),
        version=version,
    )
