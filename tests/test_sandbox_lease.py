"""Two gateways on one home and database: one runs the sandboxes, the other passes /mcp on to it,
serves one 2025-11-25 session alternately with it, and takes over when it dies.

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
    except* Exception as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):  # groups nest as deep as the client's task groups
            leaf = leaf.exceptions[0]
        caught.append(str(leaf))
    return caught[0] if caught else None


def rows_of(fleet, user: str) -> list[dict]:
    """The user's sandbox rows, without the live memory figure (measured anew at each listing)."""
    rows = [r for r in json.loads(fleet.cli("sandboxes", "list", "--all", "--json").stdout) if r.get("user") == user]
    return [{k: v for k, v in r.items() if k != "memory_bytes"} for r in rows]


async def test_one_gateway_runs_the_sandboxes_and_the_other_takes_over_when_it_dies(pair):
    first, second = pair
    key = first.add_user("lena")
    await sh(first, key, "echo still-here > /tmp/memory-only")
    (before,) = rows_of(first, "lena")

    # The standby passes the call on to the one that runs the sandboxes: the same sandbox answers.
    assert httpx.get(f"{second.base_url}/readyz", timeout=30).status_code == 200
    assert (await sh(second, key, "cat /tmp/memory-only"))["stdout"].strip() == "still-here"
    assert "standby" in second.log()
    # It started nothing: the same row, but for when the sandbox was last used (the standby's call used it,
    # and the fleet records that every few seconds, so a slow run sees it move).
    assert [without_use(row) for row in rows_of(first, "lena")] == [without_use(before)]

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


def without_use(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "last_used_at"}


def rpc(fleet, key: str, session: str | None, request_id: int | None, method: str, params: dict | None = None) -> tuple[httpx.Response, dict | None]:
    """One raw 2025-11-25 request (a notification when `request_id` is None) and its JSON-RPC answer."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    if session is not None:
        headers |= {"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    body: dict = {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}
    if request_id is not None:
        body["id"] = request_id
    response = httpx.post(fleet.mcp_url, json=body, headers=headers, timeout=120)
    if request_id is None or response.status_code >= 400:
        return response, None
    if response.headers["content-type"].startswith("text/event-stream"):
        answers = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
        return response, next(a for a in answers if a.get("id") == request_id)
    return response, response.json()


async def test_one_session_served_alternately_by_two_replicas(pair):
    first, second = pair
    key = first.add_user("mona")
    opened, answer = rpc(second, key, None, 1, "initialize", {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "alternating", "version": "1"}})
    assert opened.status_code == 200, opened.text
    assert answer is not None and answer["result"]["protocolVersion"] == "2025-11-25"
    session = opened.headers["mcp-session-id"]
    assert rpc(first, key, session, None, "notifications/initialized")[0].status_code == 202
    for n, fleet in enumerate([first, second, first, second, first, second], start=2):
        arguments = {"path": f"turn-{n}.txt", "content": f"turn {n} via {'first' if fleet is first else 'second'}"}
        response, answer = rpc(fleet, key, session, n, "tools/call", {"name": "workspace__write_file", "arguments": arguments})
        assert response.status_code == 200 and answer is not None and "result" in answer, response.text
        assert not answer["result"].get("isError"), answer
    response, answer = rpc(second, key, session, 99, "tools/call", {"name": "workspace__read_file", "arguments": {"path": "turn-3.txt"}})
    assert answer is not None and "turn 3 via second" in json.dumps(answer["result"])
    assert len(rows_of(first, "mona")) == 1  # one sandbox, started once, whichever replica was asked
    # The session ends on either: DELETE through the standby reaches the one that holds it.
    headers = {"Authorization": f"Bearer {key}", "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    assert httpx.delete(first.mcp_url.replace(str(first.port), str(second.port)), headers=headers, timeout=60).status_code in (200, 204)
    gone, _ = rpc(first, key, session, 100, "tools/list")
    assert gone.status_code == 404


async def test_the_lock_and_its_holder_are_those_of_this_database_only(postgres_url):
    """Advisory locks are per database, but pg_locks lists every database's: a standby must never take
    another fleet's gateway on the same server for its owner (it would send it its users' keys)."""
    from sandbox.lease import NodeLease, node_key
    from tests.conftest import fresh_database

    ours, theirs = fresh_database(postgres_url, "lease"), fresh_database(postgres_url, "lease")
    their_owner = NodeLease(theirs, node_key("runsc"), address="127.0.0.1:1111")
    our_owner = NodeLease(ours, node_key("runsc"), address="127.0.0.1:2222")
    standby = NodeLease(ours, node_key("runsc"), address="127.0.0.1:3333")
    try:
        assert await their_owner.try_acquire()
        assert await our_owner.try_acquire()  # another database: not held there
        assert not await standby.try_acquire()
        assert (await standby.holder()).endswith("127.0.0.1:2222")
        await our_owner.release()
        assert await standby.try_acquire()  # the holder gone, the lock is free at once
    finally:
        for lease in (their_owner, our_owner, standby):
            await lease.release()


async def test_a_released_lease_is_free_when_release_returns(postgres_url):
    """A gateway that stops hands its sandboxes over at once: its release lets the lock go before it
    returns. Closing the session alone did not (its backend lets the lock go as it exits, a moment
    after the client's close returned: about 1 handover in 40 still found the lock taken)."""
    from sandbox.lease import NodeLease, node_key
    from tests.conftest import fresh_database

    ours = fresh_database(postgres_url, "lease")
    for turn in range(200):
        owner = NodeLease(ours, node_key("runsc"), address="127.0.0.1:2222")
        standby = NodeLease(ours, node_key("runsc"), address="127.0.0.1:3333")
        try:
            assert await owner.try_acquire()
            assert not await standby.try_acquire()
            await owner.release()
            assert await standby.try_acquire(), f"turn {turn}: the lock was still held after release returned"
        finally:
            await owner.release()
            await standby.release()
