"""A tool project's server run on this machine, from its sources, with an MCP client on its stdio.

This is the fast loop for a developer's tests: no wheel and no sandbox. The server gets
what the fleet would give it and nothing more of the developer's environment: the SDK
client's small default environment (HOME, PATH, ...), the project's sources on
PYTHONPATH, and each declared secret, taken from `MCPFLEET_TEST_SECRET_<NAME>`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import IO

from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from mcpfleet_sdk import project as projects
from mcpfleet_sdk.secrets import DECLARED_ENV

TEST_SECRET_PREFIX = "MCPFLEET_TEST_SECRET_"


class ServerStartError(RuntimeError):
    """The server could not be started or did not answer; the message carries its stderr."""


def server_parameters(project: Path, environ: Mapping[str, str] | None = None) -> StdioServerParameters:
    """How to start `project`'s server from its sources. Raises ProjectError, ManifestError."""
    env_in = os.environ if environ is None else environ
    manifest = projects.load(project)
    entry = projects.console_script(project, manifest.command)
    secrets = list(manifest.fleet.secrets)
    missing = [name for name in secrets if not env_in.get(TEST_SECRET_PREFIX + name)]
    if missing:
        wanted = ", ".join(TEST_SECRET_PREFIX + name for name in missing)
        raise projects.ProjectError(
            f"server.json declares the secret(s) {', '.join(missing)} (_meta[\"io.mcpfleet\"][\"secrets\"]): "
            f"set {wanted} to the value(s) the server should get in tests"
        )
    env = {
        "PYTHONPATH": str(entry.source_root),
        "PYTHONUNBUFFERED": "1",
        DECLARED_ENV: ",".join(secrets),
        **{name: env_in[TEST_SECRET_PREFIX + name] for name in secrets},
    }
    return StdioServerParameters(command=sys.executable, args=["-c", entry.code()], env=env, cwd=str(project))


@contextlib.asynccontextmanager
async def connect(project: Path, environ: Mapping[str, str] | None = None) -> AsyncIterator[Client]:
    """An initialized `mcp.Client` on the project's server; the server stops when the block ends.

    The server's stderr is kept and written to this process's stderr afterwards (pytest shows
    it with a failing test), and is quoted when the server fails to start.
    """
    params = server_parameters(project, environ)
    # Append mode: the server shares this file's offset, and reading it must not make its next write overwrite.
    with tempfile.TemporaryFile("a+", prefix="mcpfleet-server-stderr-") as errlog:
        started = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    client = await stack.enter_async_context(Client(stdio_client(params, errlog=errlog)))
                except Exception as exc:
                    raise ServerStartError(_start_failure(project, exc, errlog)) from None
                started = True
                yield client
        finally:
            if started:
                errlog.seek(0)
                if logged := errlog.read():
                    sys.stderr.write(f"--- stderr of the server of {project.name} ---\n{logged}")


def _start_failure(project: Path, exc: BaseException, errlog: IO[str]) -> str:
    errlog.flush()
    errlog.seek(0)
    logged = errlog.read().strip()
    # The SDK's task groups wrap the one error that matters (e.g. "Connection closed") in groups.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    where = f"\n--- its stderr ---\n{logged[-4000:]}" if logged else " (it wrote nothing to stderr)"
    return f"the server of {project} did not start ({detail}){where}"
