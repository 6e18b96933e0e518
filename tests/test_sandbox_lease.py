"""Two gateways on one home and database: one runs the sandboxes, the other stands by and takes over.

Real gateways (processes), real runsc sandboxes, real PostgreSQL. The second gateway answers what
needs no sandbox and says who runs them for what does; killed outright, the first leaves its
sandbox running, and the second takes the lock and adopts that very sandbox (its memory intact):
the user's sandbox is never started twice.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, structured
from tests.conftest import Fleet, free_port, make_fleet
from tests.test_gateway_restart import runsc_containers


@pytest.fixture
def pair(tmp_path_factory, postgres_url):
    first = make_fleet(tmp_path_factory, postgres_url)
    port = free_port()
    second = Fleet(home=first.home, database_url=first.database_url, port=port, env={**first.env, "MCPFLEET_PORT": str(port)})
    second.log_path = first.home / "second.log"
    first.start()
    second.start()
    yield first, second
    second.stop()
    first.stop()


async def sh(fleet, key: str, command: str) -> dict:
    async with connect(fleet.mcp_url, key) as client:
        return structured(await client.call_tool("exec__run", {"command": command, "timeout_s": 30}))


async def refusal(fleet, key: str) -> str | None:
    """The JSON-RPC error a call gets (the client raises it inside its task group), or None if it works."""
    caught: list[str] = []
    try:
        await sh(fleet, key, "true")
    except* MCPError as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):  # groups nest as deep as the client's task groups
            leaf = leaf.exceptions[0]
        caught.append(str(leaf))
    return caught[0] if caught else None


def rows_of(fleet, user: str) -> list[dict]:
    return [r for r in json.loads(fleet.cli("sandboxes", "list", "--all", "--json").stdout) if r.get("user") == user]


async def test_one_gateway_runs_the_sandboxes_and_the_other_takes_over_when_it_dies(pair):
    first, second = pair
    key = first.add_user("lena")
    await sh(first, key, "echo still-here > /tmp/memory-only")
    (before,) = rows_of(first, "lena")

    # The standby serves what needs no sandbox, and says who runs them for what does.
    assert httpx.get(f"{second.base_url}/readyz", timeout=30).status_code == 200
    refused = await refusal(second, key)
    assert refused is not None and "standby" in refused and "runs the sandboxes" in refused
    assert "standby" in second.log()
    assert rows_of(first, "lena") == [before]  # it started nothing

    first.stop(signal.SIGKILL)  # a replica dying: its sandbox runs on, its lock goes with its session
    deadline = time.monotonic() + 120
    while (refused := await refusal(second, key)) is not None:
        assert time.monotonic() < deadline, f"the standby never took over ({refused}):\n{second.log()[-3000:]}"
        time.sleep(1)
    out = await sh(second, key, "cat /tmp/memory-only")
    assert out["stdout"].strip() == "still-here"  # adopted, not started again
    (after,) = rows_of(second, "lena")
    assert after["id"] == before["id"] and after["state"] == "Running"
    assert runsc_containers(second) == {before["id"]: "running"}
