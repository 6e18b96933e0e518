"""The lifecycle seen from outside: a client's call wakes a hibernated sandbox, the CLI acts through
the running gateway, the audit log records each step, a gateway killed mid-hibernation recovers,
and a caller over its tenant's cap gets a clear error."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import psycopg
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, structured, text_of
from tests.conftest import MCPFLEET, make_fleet
from tests.test_gateway_restart import runsc_containers


@pytest.fixture
def pool_fleet(tmp_path_factory, postgres_url):
    fleet = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_WARM_POOL_SIZE="1")
    fleet.start()
    yield fleet
    fleet.stop()


def sandboxes(fleet) -> list[dict]:
    return json.loads(fleet.cli("sandboxes", "list", "--json").stdout)


async def run(fleet, key: str, command: str, **options) -> dict:
    async with connect(fleet.mcp_url, key) as client:
        return structured(await client.call_tool("exec__run", {"command": command, **options}))


def wait_for(predicate, timeout: float = 120.0, what: str = "the condition", interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := predicate()):
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_call_wakes_a_hibernated_sandbox_with_its_memory(pool_fleet):
    fleet = pool_fleet
    [warm] = wait_for(
        lambda: [r for r in sandboxes(fleet) if r["user_id"] is None and r["state"] == "Running"], what="a warm sandbox"
    )
    key = fleet.add_user("alice")
    await run(fleet, key, "echo only-in-memory > /tmp/note")
    [mine] = [r for r in sandboxes(fleet) if r["user"] == "alice"]
    assert mine["id"] == warm["id"] and mine["claimed_at"]  # the first call claimed the warm sandbox
    ticker = await run(fleet, key, "while :; do date +%s%N > /tmp/tick; sleep 0.2; done", background=True)

    done = fleet.cli("sandboxes", "hibernate", "alice")
    assert "hibernate default/alice: done" in done.stdout
    [row] = [r for r in sandboxes(fleet) if r["user"] == "alice"]
    assert row["state"] == "Hibernated" and row["checkpoint_bytes"] > 0
    assert mine["id"] not in runsc_containers(fleet)

    started = time.perf_counter()
    out = await run(fleet, key, f"cat /tmp/note; kill -0 {ticker['background_pid']} && echo ticking")
    print(f"\nresume through the gateway to first result: {time.perf_counter() - started:.2f} s")
    assert out["stdout"] == "only-in-memory\nticking\n"
    [row] = [r for r in sandboxes(fleet) if r["user"] == "alice"]
    assert (row["id"], row["state"]) == (mine["id"], "Running")
    assert fleet.cli("sandboxes", "hibernate", "bob", check=False).returncode != 0  # no such user

    # Reclaimed from the CLI: the next call starts afresh, on the same workspace.
    await run(fleet, key, "echo on-disk > /workspace/kept.txt")
    assert "reclaim default/alice: done" in fleet.cli("sandboxes", "reclaim", "alice").stdout
    out = await run(fleet, key, "cat /workspace/kept.txt; cat /tmp/note 2>/dev/null || echo fresh")
    assert out["stdout"] == "on-disk\nfresh\n"

    audit = [json.loads(line) for line in fleet.cli("audit", "export", "--json").stdout.splitlines()]
    steps = [e["action"] for e in audit if e["target"] == mine["id"]]
    order = [steps.index(f"sandbox.{s}") for s in ("hibernating", "hibernated", "resuming", "reclaimed")]
    assert order == sorted(order), steps
    # Warm, it was nobody's; from its claim on, every step names alice's tenant.
    assert [e["tenant"] for e in audit if e["target"] == mine["id"]][steps.index("sandbox.running", 3):] == [
        "default"
    ] * (len(steps) - steps.index("sandbox.running", 3))
    assert fleet.cli("audit", "verify").returncode == 0


async def test_a_gateway_killed_while_hibernating_recovers_a_consistent_sandbox(tmp_path_factory, postgres_url):
    fleet = make_fleet(tmp_path_factory, postgres_url)
    fleet.start()
    try:
        key = fleet.add_user("carol")
        await run(fleet, key, "echo remembered > /tmp/note")
        request = subprocess.Popen([*MCPFLEET, "sandboxes", "hibernate", "carol"], env=fleet.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Watched in the database, not with `sandboxes list`: on a loaded host one CLI run (an
        # interpreter start) can take longer than the whole checkpoint, and a poll would miss it.
        with psycopg.connect(fleet.database_url, autocommit=True) as conn:
            wait_for(
                lambda: conn.execute("SELECT 1 FROM sandboxes WHERE state = 'Hibernating'").fetchone(),
                what="Hibernating", interval=0.02,
            )  # fmt: skip
        time.sleep(0.5)  # somewhere inside the checkpoint
        fleet.stop(signal.SIGKILL)
        request.kill()
        request.wait()
        fleet.start()
        [row] = sandboxes(fleet)
        assert row["state"] in ("Running", "Hibernated"), row
        containers = runsc_containers(fleet)
        if row["state"] == "Running":
            assert containers == {row["id"]: "running"}, containers
        else:  # at most the stopped remains of the checkpointed container, which the resume replaces
            assert set(containers.values()) <= {"stopped"}, containers
            processes = subprocess.run(["pgrep", "-f", f"runsc.*{row['id']}"], capture_output=True, text=True)
            assert processes.stdout == "", processes.stdout
        mounts = subprocess.run(["findmnt", "-rno", "TARGET,PROPAGATION"], capture_output=True, text=True).stdout
        ours = dict(line.rsplit(" ", 1) for line in mounts.splitlines() if line.startswith(str(fleet.home)))
        # The sandboxes dir stays the shared mount the killed gateway made, and the new one keeps it.
        assert ours.pop(str(fleet.home / "sandboxes")) == "shared", ours
        assert len(ours) == (1 if row["state"] == "Running" else 0), ours
        # Either way, memory and all: rolled back (still running) or finished (restored on this call).
        out = await run(fleet, key, "cat /tmp/note")
        assert out["stdout"] == "remembered\n"
    finally:
        fleet.stop()


async def test_a_caller_over_the_tenant_cap_gets_a_clear_error(fleet):
    fleet.cli("tenants", "add", "capped")
    fleet.cli("sandboxes", "cap", "capped", "--max-running", "1")
    busy = fleet.add_user("dan", tenant="capped")
    waiting = fleet.add_user("eve", tenant="capped")
    await run(fleet, busy, "true")
    slow = asyncio.create_task(run(fleet, busy, "sleep 4"))
    await asyncio.sleep(1.0)
    async with connect(fleet.mcp_url, waiting) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("exec__run", {"command": "true"})
    assert refused.value.error.code == -32001
    assert "tenant 'capped' may run 1 sandbox at once" in refused.value.error.message
    await slow
    async with connect(fleet.mcp_url, waiting) as client:  # dan's is idle now: it hibernates for eve's
        assert "exit code 0" in text_of(await client.call_tool("exec__run", {"command": "true"}))
    states = {r["user"]: r["state"] for r in sandboxes(fleet) if r["tenant"] == "capped"}
    assert states == {"dan": "Hibernated", "eve": "Running"}


async def test_a_client_that_connects_wakes_its_hibernated_sandbox_before_its_first_call(fleet):
    key = fleet.add_user("erin")
    await run(fleet, key, "echo only-in-memory > /tmp/note")
    [mine] = [r for r in sandboxes(fleet) if r["user"] == "erin"]
    # The 2025-11-25 handshake (`initialize`), then the 2026-07-28 one (`server/discover`, probed by "auto").
    for mode in ("legacy", "auto"):
        assert "hibernate default/erin: done" in fleet.cli("sandboxes", "hibernate", "erin").stdout
        async with connect(fleet.mcp_url, key, mode=mode):  # connected, and not one call made
            deadline = time.monotonic() + 120
            while not [r for r in sandboxes(fleet) if r["user"] == "erin" and r["state"] == "Running"]:
                assert time.monotonic() < deadline, f"the {mode} handshake did not wake the sandbox"
                await asyncio.sleep(0.2)
    out = await run(fleet, key, "cat /tmp/note")
    assert out["stdout"] == "only-in-memory\n"  # resumed with its memory, not started afresh
    assert [(r["id"], r["state"]) for r in sandboxes(fleet) if r["user"] == "erin"] == [(mine["id"], "Running")]
    audit = [json.loads(line) for line in fleet.cli("audit", "export", "--json").stdout.splitlines()]
    assert [e["action"] for e in audit if e["target"] == mine["id"]].count("sandbox.resuming") == 2  # one per wake
