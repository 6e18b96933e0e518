"""The sandbox manager the gateway routes into, built from the fleet's settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from gateway.settings import Settings
from sandbox.limits import Limits, MiB
from sandbox.manager import SandboxManager
from sandbox.runsc_backend import RunscBackend
from sandbox.runtime import PythonRuntime, current_python, venv_python
from sandbox.servers import BUILTIN_SERVERS

log = logging.getLogger(__name__)

SANDBOX_VENV = Path(__file__).resolve().parent.parent / ".venv-sandbox"
"""Built by scripts/setup.sh next to the project when the machine has Python 3.12 or later."""


def sandbox_python() -> PythonRuntime:
    """The venv that MCPFLEET_SANDBOX_PYTHON names, else the project's .venv-sandbox, else the gateway's Python."""
    configured = os.environ.get("MCPFLEET_SANDBOX_PYTHON")
    venv = Path(configured) if configured else SANDBOX_VENV if SANDBOX_VENV.exists() else None
    if venv is None:
        return current_python()
    try:
        return venv_python(venv)
    except RuntimeError as exc:
        hint = "MCPFLEET_SANDBOX_PYTHON must name a venv" if configured else "run scripts/setup.sh to rebuild it"
        raise RuntimeError(f"the sandboxes' Python: {exc} ({hint})") from None


def sandbox_manager(settings: Settings, pool: AsyncConnectionPool) -> SandboxManager:
    limits = Limits(
        memory_bytes=settings.sandbox_memory_mb * MiB, pids=settings.sandbox_pids, cpus=settings.sandbox_cpus
    )
    python = sandbox_python()
    log.info("sandboxes run Python %s (%s)", python.version, python.executable)
    backend = RunscBackend(settings.home / "runsc", python=python)
    # Every user gets the built-in servers until the registry decides per user.
    return SandboxManager(settings.home, pool, backend, BUILTIN_SERVERS, limits)
