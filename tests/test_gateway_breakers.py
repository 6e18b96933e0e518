"""Circuit breakers against a real gateway and real gVisor sandboxes: a server that keeps failing in
one user's sandbox is fenced for that user alone, callers are refused at once with a JSON-RPC
error naming it and the retry time, and after the cool-down a probe call lets it back in."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import psycopg
import pytest
from mcp.shared.exceptions import MCPError

from gateway.breakers import BREAKER_OPEN
from tests.clients import connect, text_of
from tests.conftest import make_fleet
from tests.test_registry import cli, project

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

COOLDOWN_S = 4
SLOW_FAILURE_S = 0.5
# A server whose one tool fails on the server's side (a JSON-RPC internal error, not an isError
# answer) after a while, as a server whose backend is down does, while the user's workspace says so.
FLAKY = f'''
import asyncio
from mcp.shared.exceptions import MCPError

@server.tool(description="Read the gauge")
async def read() -> str:
    try:
        broken = open("/workspace/.state").read() == "broken"
    except OSError:
        broken = False
    if broken:
        await asyncio.sleep({SLOW_FAILURE_S})
        raise MCPError(code=-32603, message="the gauge's backend is down")
    return "42"
'''


@pytest.fixture(scope="module")
def fenced_fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_BREAKER_COOLDOWN_S=str(COOLDOWN_S))
    running.start()
    running.keys = {
        "admin": running.add_user("root-admin", role="admin"),
        "publisher": running.add_user("pat", role="publisher"),
        "alice": running.add_user("alice"),
        "bob": running.add_user("bob"),
    }
    yield running
    running.stop()


async def timed_read(client) -> tuple[float, object]:
    started = time.perf_counter()
    try:
        outcome: object = await client.call_tool("flaky__read", {})
    except MCPError as exc:
        outcome = exc
    return time.perf_counter() - started, outcome


async def test_a_failing_server_is_fenced_for_its_user_alone_and_a_probe_lets_it_back(fenced_fleet, tmp_path):
    fleet = fenced_fleet
    root = project(tmp_path, "io.example/flaky", "1.0.0", FLAKY)
    assert "passed" in cli(fleet, fleet.keys["publisher"], "publish", str(root)).stdout
    cli(fleet, fleet.keys["admin"], "registry", "approve", "io.example/flaky", "1.0.0")

    async with connect(fleet.mcp_url, fleet.keys["bob"]) as bob, connect(fleet.mcp_url, fleet.keys["alice"]) as alice:
        assert text_of(await alice.call_tool("flaky__read", {})) == "42"
        await bob.call_tool("workspace__write_file", {"path": ".state", "content": "broken"})
        # Three slow server-side failures, each reaching the server.
        failing_times = []
        for _ in range(3):
            elapsed, outcome = await timed_read(bob)
            assert isinstance(outcome, MCPError) and outcome.error.code == -32603, outcome
            assert elapsed >= SLOW_FAILURE_S
            failing_times.append(elapsed)
        # Then fenced: refused at once, saying which server and when to retry.
        fenced_times = []
        for _ in range(3):
            elapsed, outcome = await timed_read(bob)
            assert isinstance(outcome, MCPError) and outcome.error.code == BREAKER_OPEN, outcome
            assert "flaky" in outcome.error.message and "retry in" in outcome.error.message, outcome.error.message
            assert 0 < outcome.error.data["retryAfterSeconds"] <= COOLDOWN_S
            fenced_times.append(elapsed)
        assert max(fenced_times) < 0.1, fenced_times
        print(f"failing calls {[round(t * 1e3) for t in failing_times]} ms, fenced {[round(t * 1e3, 1) for t in fenced_times]} ms")
        # Alice's calls to the same server, and bob's to his other servers, are not affected.
        elapsed, outcome = await timed_read(alice)
        assert text_of(outcome) == "42" and elapsed < SLOW_FAILURE_S
        await bob.call_tool("workspace__write_file", {"path": ".state", "content": "mended"})
        # After the cool-down one call probes the server; it works again, and so the fence is lifted.
        await asyncio.sleep(COOLDOWN_S + 0.2)
        elapsed, outcome = await timed_read(bob)
        assert text_of(outcome) == "42", outcome
        assert text_of(await bob.call_tool("flaky__read", {})) == "42"

    page = httpx.get(fleet.base_url + "/metrics", timeout=10).text
    refused = [line for line in page.splitlines() if line.startswith('mcpfleet_refusals_total{reason="breaker"}')]
    assert refused and float(refused[0].split()[-1]) == 3, refused
    # One audit entry for the one opening (the refused calls are audited as every call is).
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(fleet.database_url) as conn:
            openings = list(conn.execute(
                "SELECT actor, target, outcome FROM audit_entries WHERE action = 'breaker.open' ORDER BY id"
            ))
        if openings or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert len(openings) == 1 and openings[0][0] == "default/bob" and "flaky" in openings[0][1], openings


async def test_a_sandbox_that_cannot_start_is_fenced_and_a_probe_starts_it_once_mended(fenced_fleet):
    fleet = fenced_fleet
    carol = fleet.add_user("carol")
    with psycopg.connect(fleet.database_url) as conn:
        [(user_id,)] = list(conn.execute("SELECT id FROM users WHERE name = 'carol'"))
    # A stand-in for a broken workspace volume: garbage where carol's workspace image goes (and a plain
    # file where its directory goes, on machines without quotas), so each cold start of hers fails.
    root = fleet.home / "workspaces"
    blockers = [root / f"{user_id}.img", root / str(user_id)]
    root.mkdir(parents=True, exist_ok=True)
    for blocker in blockers:
        blocker.write_bytes(b"not a workspace\n" * 4096)

    async def timed_list(client) -> tuple[float, object]:
        started = time.perf_counter()
        try:
            outcome: object = await client.list_tools()
        except MCPError as exc:
            outcome = exc
        return time.perf_counter() - started, outcome

    async with connect(fleet.mcp_url, carol) as client, connect(fleet.mcp_url, fleet.keys["alice"]) as alice:
        failing_times = []
        for _ in range(3):
            elapsed, outcome = await timed_list(client)
            assert isinstance(outcome, MCPError) and outcome.error.code == -32603, outcome
            assert "could not be started" in outcome.error.message
            failing_times.append(elapsed)
        fenced_times = []
        for _ in range(3):
            elapsed, outcome = await timed_list(client)
            assert isinstance(outcome, MCPError) and outcome.error.code == BREAKER_OPEN, outcome
            assert "your sandbox's start" in outcome.error.message and "retry in" in outcome.error.message
            fenced_times.append(elapsed)
        assert max(fenced_times) < 0.1, fenced_times
        print(f"failed starts {[round(t * 1e3) for t in failing_times]} ms, fenced {[round(t * 1e3, 1) for t in fenced_times]} ms")
        assert "flaky__read" in {t.name for t in (await alice.list_tools()).tools}  # others start and call as before
        for blocker in blockers:
            blocker.unlink()
        await asyncio.sleep(COOLDOWN_S + 0.2)
        elapsed, outcome = await timed_list(client)  # the probe: a cold start, which now succeeds
        assert not isinstance(outcome, MCPError), outcome
        assert "workspace__write_file" in {t.name for t in outcome.tools}
