"""`mcpfleet up --replicas 2`: two real gateway processes behind one port (SO_REUSEPORT).

Calls over fresh connections land on either replica (the kernel picks per connection); every one is
served by the one sandbox of the user, started once. A replica killed outright is started again by
the parent, and calls go on meanwhile (at worst a few refused while a standby takes over).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import psutil
import psycopg
import pytest

from tests.clients import connect, structured
from tests.conftest import MCPFLEET, make_fleet


@pytest.fixture
def replicated(tmp_path_factory, postgres_url):
    fleet = make_fleet(tmp_path_factory, postgres_url)
    log = open(fleet.log_path, "ab")
    fleet.process = subprocess.Popen([*MCPFLEET, "up", "--port", str(fleet.port), "--replicas", "2"],
                                     env=fleet.env, stdout=log, stderr=log)
    try:  # stopped even if it never became ready: a parent left running restarts its replicas for ever
        deadline = time.monotonic() + 240
        while len(replicas(fleet)) < 2 or not all_ready(fleet):
            assert fleet.process.poll() is None, fleet.log()
            assert time.monotonic() < deadline, f"the replicas did not become ready:\n{fleet.log()}"
            time.sleep(0.5)
        yield fleet
    finally:
        fleet.stop()


def replicas(fleet) -> list[psutil.Process]:
    return psutil.Process(fleet.process.pid).children()


def all_ready(fleet) -> bool:
    try:  # several connections: each may land on either replica
        return all(httpx.get(f"{fleet.base_url}/readyz", timeout=5).status_code == 200 for _ in range(6))
    except httpx.HTTPError:
        return False


async def call(fleet, key: str, n: int) -> str:
    async with connect(fleet.mcp_url, key) as client:  # a new connection, so either replica
        await client.call_tool("workspace__write_file", {"path": f"r{n}.txt", "content": str(n)})
        return structured(await client.call_tool("exec__run", {"command": "cat /tmp/boot-id 2>/dev/null || "
                                                               "(cat /proc/sys/kernel/random/uuid > /tmp/boot-id; cat /tmp/boot-id)"}))["stdout"]


async def test_two_replicas_behind_one_port_serve_one_sandbox_per_user(replicated):
    fleet = replicated
    key = fleet.add_user("rita")
    seen = {await call(fleet, key, n) for n in range(8)}
    assert len(seen) == 1  # one sandbox (its memory the same) whichever replica took the connection
    rows = [r for r in json.loads(fleet.cli("sandboxes", "list", "--all", "--json").stdout) if r.get("user") == "rita"]
    assert len(rows) == 1
    assert "runs the sandboxes: this gateway is on standby" in fleet.log()

    victim = replicas(fleet)[0]
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 120
    served = 0
    while served < 4:
        try:
            assert await call(fleet, key, 100 + served) in seen  # the same sandbox, adopted if its owner died
            served += 1
        except Exception:
            assert time.monotonic() < deadline, f"calls did not resume after a replica died:\n{fleet.log()[-4000:]}"
            time.sleep(1)
    while len([p for p in replicas(fleet) if p.pid != victim.pid]) < 2:
        assert time.monotonic() < deadline, "the dead replica was not started again"
        time.sleep(0.5)


def refused_ips(fleet) -> list[str]:
    with psycopg.connect(fleet.database_url) as conn:
        rows = conn.execute("SELECT detail->>'ip' FROM audit_entries WHERE action = 'auth.refused' "
                            "AND detail->>'reason' = 'malformed key'").fetchall()
    return [r[0] for r in rows]


async def test_the_owner_audits_a_passed_on_request_under_the_clients_address_which_the_client_cannot_choose(replicated):
    """Attack: a client names another address in X-Forwarded-For (and guesses at the replicas' header).
    It connects from 127.0.0.2, so the address a replica passes on differs from the hop's own (127.0.0.1)."""
    fleet = replicated
    spoof = {"Authorization": "Bearer mcpf_not-a-key", "X-Forwarded-For": "203.0.113.7",
             "X-Mcpfleet-Replica": "guessed", "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    deadline = time.monotonic() + 90
    # Each replica audits a refusal once per reason and address per 10 s: the standby's own, and the
    # owner's of the requests passed on to it. Sent until both are in (a replica may still be starting).
    while len(ips := refused_ips(fleet)) < 2:
        assert time.monotonic() < deadline, f"expected the refusals of both replicas, got {ips}"
        for _ in range(8):  # fresh connections: the kernel spreads them over both replicas
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                assert (await client.post(fleet.mcp_url, json=body, headers=spoof)).status_code == 401
        time.sleep(1)
    assert set(ips) == {"127.0.0.2"}
