"""pytest fixtures for tool projects (registered through the `pytest11` entry point).

    async def test_forecast(tool_server):
        result = await tool_server.call_tool("forecast", {"city": "Oslo"})

`tool_server` is an `mcp.Client` connected over stdio to the project's server, started from
its sources (see `mcpfleet_sdk.local`). The project is `MCPFLEET_PROJECT` if set, else the
test run's rootdir; override the `tool_project` fixture to point elsewhere.

Async fixtures need pytest-asyncio; without it `tool_server` fails with a message saying
so instead of breaking pytest for every project in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mcpfleet_sdk import project as projects

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - depends on the environment
    pytest_asyncio = None


@pytest.fixture
def tool_project(request: pytest.FixtureRequest) -> Path:
    named = os.environ.get(projects.PROJECT_ENV)
    directory = Path(named).resolve() if named else Path(request.config.rootpath)
    if not (directory / projects.MANIFEST).is_file():
        source = projects.PROJECT_ENV if named else "the test run's rootdir"
        pytest.fail(
            f"tool_server: {directory} ({source}) has no {projects.MANIFEST}; run pytest in the tool project, "
            f"set {projects.PROJECT_ENV}, or override the tool_project fixture",
            pytrace=False,
        )
    return directory


@contextlib.asynccontextmanager
async def _serve(directory: Path) -> AsyncIterator[object]:
    # Imported here: the plugin loads in every pytest run of the environment, most of which never use it.
    from mcpfleet_sdk.local import ServerStartError, connect
    from registry.manifest import ManifestError

    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    # The SDK's client lives in anyio task groups, which must be left in the task that entered
    # them; pytest-asyncio sets a fixture up and tears it down in different tasks. So one task
    # holds the connection for the fixture's lifetime, and tests use the client from theirs.
    async def hold() -> None:
        try:
            async with connect(directory) as client:
                ready.set_result(client)
                await done.wait()
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)

    holder = asyncio.create_task(hold(), name=f"tool_server {directory.name}")
    try:
        client = await ready
    except (projects.ProjectError, ManifestError, ServerStartError) as exc:
        await holder
        pytest.fail(f"tool_server: {exc}", pytrace=False)
    try:
        yield client
    finally:
        done.set()
        await holder


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def tool_server(tool_project: Path) -> AsyncIterator[object]:
        async with _serve(tool_project) as client:
            yield client

else:  # pragma: no cover - depends on the environment

    @pytest.fixture
    def tool_server(tool_project: Path) -> None:
        pytest.fail("tool_server is an async fixture: install pytest-asyncio (pip install pytest-asyncio)", pytrace=False)
