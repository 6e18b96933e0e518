"""A running sandbox's servers follow what its user may run: added, removed and replaced live
(real runsc), with their code reaching the sandbox through its read-only tools dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from sandbox.bundle import TOOLS
from sandbox.servers import ServerSpec
from tests.test_sandbox_lifecycle import SERVERS, call, fleets, sh  # noqa: F401  (fleets is a fixture)
from tests.test_sandbox_supervisor import text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

GREETER = """
import sys
from mcp.server.mcpserver import MCPServer
server = MCPServer("greeter")

@server.tool(description="Say hello")
def hello() -> str:
    return "hello from revision {revision}"

server.run()
"""


class ChangingServers:
    """A server source whose answer the test changes, with greeter code placed in the tools dir."""

    def __init__(self) -> None:
        self.extra: dict[int | None, tuple[ServerSpec, ...]] = {}

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        return (*SERVERS, *self.extra.get(user_id, ()))

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        tools_dir.mkdir(mode=0o755, exist_ok=True)
        wanted = {s.revision for s in servers if s.revision != "builtin"}
        for stale in {p.name for p in tools_dir.iterdir()} - wanted:
            shutil.rmtree(tools_dir / stale)
        for revision in wanted:
            (tools_dir / revision).mkdir(mode=0o755, exist_ok=True)
            (tools_dir / revision / "greeter_tool.py").write_text(GREETER.format(revision=revision))


def greeter(revision: str) -> ServerSpec:
    code = f"import sys; sys.path.insert(0, '{TOOLS}/{revision}'); import greeter_tool"
    return ServerSpec("greeter", ("python", "-c", code), revision=revision)


async def test_servers_are_added_replaced_and_removed_in_a_running_sandbox(fleets):
    fleet = await fleets("configure")
    source = ChangingServers()
    manager = await fleet.manager(source)
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    assert set(await sandbox.client.catalog()) == {"fixture", "exec"}
    counter = int(text(await call(sandbox, "counter")))

    source.extra[alice[0]] = (greeter("r1"),)
    assert await manager.ensure(*alice) is sandbox  # the same sandbox, not a fresh one
    catalog = await sandbox.client.catalog()
    assert [t["name"] for t in catalog["greeter"]["tools"]] == ["hello"]
    assert text(await call(sandbox, "hello", server="greeter")) == "hello from revision r1"
    # The servers that stayed kept running: their memory is intact.
    assert int(text(await call(sandbox, "counter"))) == counter + 1
    # Only its own installs are in sight, and read-only.
    listing = await sh(sandbox, f"ls {TOOLS}; touch {TOOLS}/r1/x 2>&1 || true")
    assert listing["stdout"].split()[0] == "r1"
    assert "Read-only file system" in listing["stdout"] or "Permission denied" in listing["stdout"]

    source.extra[alice[0]] = (greeter("r2"),)
    await manager.ensure(*alice)
    assert text(await call(sandbox, "hello", server="greeter")) == "hello from revision r2"
    assert os.listdir(sandbox.directory / "tools") == ["r2"]

    source.extra.pop(alice[0])
    await manager.ensure(*alice)
    assert set(await sandbox.client.catalog()) == {"fixture", "exec"}
    assert int(text(await call(sandbox, "counter"))) == counter + 2


async def test_a_resumed_sandbox_is_brought_to_what_its_user_may_run_now(fleets):
    fleet = await fleets("configure-resume")
    source = ChangingServers()
    manager = await fleet.manager(source)
    bob = await fleet.user("bob")
    source.extra[bob[0]] = (greeter("r1"),)
    sandbox = await manager.ensure(*bob)
    assert text(await call(sandbox, "hello", server="greeter")) == "hello from revision r1"
    assert await manager.hibernate(bob[0])
    source.extra.pop(bob[0])  # revoked while it slept
    resumed = await manager.ensure(*bob)
    assert set(await resumed.client.catalog()) == {"fixture", "exec"}
