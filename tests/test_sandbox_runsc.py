"""Sandboxes for real: runsc (gVisor), the supervisor as init, PostgreSQL rows, the SandboxManager.

Sandboxes take seconds to start, so the tests share them where they can, and
the ones that break a sandbox on purpose use a user of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.accounts import add_user
from sandbox import store
from sandbox.backends.base import SandboxSpec
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.limits import Limits
from sandbox.manager import SANDBOX_UID, SandboxManager
from sandbox.backends.runsc import RunscBackend
from sandbox.servers import ServerSpec
from sandbox.store import State
from tests.test_sandbox_supervisor import FIXTURE_SERVER, payload, text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

SERVERS = [
    ServerSpec("fixture", ("python", "-c", FIXTURE_SERVER)),
    ServerSpec("workspace", ("python", "-m", "mcp_servers.workspace")),
]
TENANT = f"sbx-{os.getpid()}"
STANDARD = Limits()
"""The `standard` tier's limits, every test user's."""


@pytest.fixture(scope="module")
def backend(home):
    return RunscBackend(home / "runsc", cgroup_parent="/mcpfleet-test")


@pytest.fixture(scope="module")
async def manager(home, db_pool, backend):
    manager = SandboxManager(home, db_pool, backend, SERVERS, start_timeout=120)
    await manager.start()
    yield manager
    await manager.close()
    for container in await backend.list():
        await backend.destroy(container.id)


class Users:
    def __init__(self, pool):
        self.pool = pool
        self.ids: dict[str, int] = {}

    async def __call__(self, name: str) -> tuple[int, str, str]:
        if name not in self.ids:
            async with self.pool.connection() as conn:
                self.ids[name] = (await add_user(conn, name, tenant=TENANT)).user_id
        return self.ids[name], TENANT, name


@pytest.fixture(scope="module")
def users(db_pool):
    return Users(db_pool)


async def call(sandbox, tool: str, server: str = "fixture", **arguments) -> dict:
    return await sandbox.client.request(server, "tools/call", {"name": tool, "arguments": arguments}, timeout=60)


async def rows_of(pool, user_id: int) -> list[dict]:
    async with pool.connection() as conn:
        return [r for r in await store.list_sandboxes(conn, include_ended=True) if r["user_id"] == user_id]


@contextlib.contextmanager
def workspace_of(manager: SandboxManager, user_id: int) -> Iterator[Path]:
    """The user's workspace on the host, mounted for the block if no sandbox of theirs holds it."""
    key = str(user_id)
    mounted = manager.workspaces.mounted(key)
    if mounted is not None:
        yield mounted
        return
    at = Path(tempfile.mkdtemp(prefix="ws-", dir=manager.home))
    manager.workspaces.mount(key, at)
    try:
        yield at
    finally:
        manager.workspaces.unmount(at)
        at.rmdir()


def runsc_processes(backend: RunscBackend) -> list[int]:
    return backend.stray_processes(keep=set())


async def test_a_tool_call_runs_in_gvisor_as_an_unprivileged_user(manager, users, backend):
    alice = await users("alice")
    started = time.perf_counter()
    sandbox = await manager.ensure(*alice)
    who = payload(await call(sandbox, "whoami"))
    print(f"\ncold start to first tool result: {time.perf_counter() - started:.2f} s")
    assert who["release"] == "4.4.0"  # gVisor's, not the host's
    assert who["release"] != os.uname().release
    assert (who["uid"], who["gid"]) == (SANDBOX_UID, SANDBOX_UID)
    assert who["cwd"] == who["home"] == "/workspace"
    assert sandbox.id.startswith("sbx-")
    # It started with every CPU of the host; now that its servers are up, it has its own share.
    assert backend.cpu_quota_us(sandbox.id) == STANDARD.cpu_quota_us
    [row] = [r for r in await manager.list() if r["user_id"] == alice[0]]
    assert (row["id"], row["state"], row["user"], row["tenant"]) == (sandbox.id, "Running", "alice", TENANT)
    assert row["created_at"] <= row["last_used_at"]


async def test_builtin_workspace_server_writes_to_the_users_workspace(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    catalog = await sandbox.client.catalog()
    assert catalog["workspace"]["state"] == "ready"
    tools = {t["name"] for t in catalog["workspace"]["tools"]}
    write = next(name for name in tools if "write" in name)
    read = next(name for name in tools if "read" in name)
    schema = next(t for t in catalog["workspace"]["tools"] if t["name"] == write)["inputSchema"]["properties"]
    content_key = "content" if "content" in schema else next(k for k in schema if k != "path")
    await call(sandbox, write, server="workspace", path="notes/hello.txt", **{content_key: "hi from alice"})
    on_host = sandbox.workspace / "notes" / "hello.txt"
    assert on_host.read_text() == "hi from alice"
    assert on_host.stat().st_uid == SANDBOX_UID
    assert "hi from alice" in text(await call(sandbox, read, server="workspace", path="notes/hello.txt"))


async def test_no_network_not_even_the_hosts_loopback(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    accepted = []
    listener = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        outcome = text(await call(sandbox, "connect", host="127.0.0.1", port=port))
        assert outcome.startswith("failed"), outcome
        outcome = text(await call(sandbox, "connect", host="1.1.1.1", port=53))
        assert outcome.startswith("failed"), outcome
    finally:
        listener.close()
    assert accepted == []


async def test_root_is_read_only_and_the_project_is_not_visible(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    assert text(await call(sandbox, "write_file", path="/etc/passwd", text="x")).startswith("Error")
    assert "error" in text(await call(sandbox, "read_file", path="/opt/mcpfleet/lib/../../../work/main/pyproject.toml"))
    assert "error" in text(await call(sandbox, "read_file", path=str(manager.home / "runsc" / "x")))
    assert text(await call(sandbox, "write_file", path="/tmp/scratch", text="fine")) == "written"
    # The servers' environment was in the supervisor's config; it is read once and gone.
    assert "error" in text(await call(sandbox, "read_file", path="/run/mcpfleet/supervisor.json"))
    assert not (sandbox.directory / "channel" / "supervisor.json").exists()


IMPOSTOR = """
import json, socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/mcpfleet/gateway.sock")
s.sendall(json.dumps({"type": "hello", "servers": {}, "token": "guess"}).encode() + b"\\n")
s.settimeout(10)
print("closed" if s.recv(100) == b"" else "answered")
"""


# Reads another process's memory. It works on a child of its own, so a refusal means something.
PEEK = """
import os, subprocess
pid = PID
start = int(open(f"/proc/{pid}/maps").readline().split("-")[0], 16)
with open(f"/proc/{pid}/mem", "rb") as mem:
    mem.seek(start)
    print(f"read {len(mem.read(16))} bytes")
"""
OWN_CHILD = "subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid"


async def test_code_in_the_sandbox_cannot_pose_as_the_supervisor(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    assert text(await call(sandbox, "run_python", code=IMPOSTOR)).strip() == "closed"
    assert sandbox.client.connected
    assert text(await call(sandbox, "echo", text="still mine")) == "still mine"
    # Nor read the token (or the servers' environment) out of the supervisor's memory.
    supervisor = sandbox.client.supervisor["pid"]
    assert "read 16 bytes" in text(await call(sandbox, "run_python", code=PEEK.replace("PID", OWN_CHILD)))
    outcome = text(await call(sandbox, "run_python", code=PEEK.replace("PID", str(supervisor))))
    assert "PermissionError" in outcome, outcome


async def test_two_users_see_only_their_own_workspace(manager, users):
    alice, bob = await asyncio.gather(manager.ensure(*await users("alice")), manager.ensure(*await users("bob")))
    assert alice.id != bob.id and alice.workspace != bob.workspace
    await call(alice, "write_file", path="/workspace/alice-secret.txt", text="for alice only")
    await call(bob, "write_file", path="/workspace/bob-note.txt", text="bob's")
    assert "alice-secret.txt" not in payload(await call(bob, "whoami"))["workspace"]
    assert "bob-note.txt" in payload(await call(bob, "whoami"))["workspace"]
    assert "error" in text(await call(bob, "read_file", path="/workspace/alice-secret.txt"))
    assert "error" in text(await call(bob, "read_file", path=str(alice.workspace / "alice-secret.txt")))
    assert (alice.workspace / "alice-secret.txt").read_text() == "for alice only"
    assert not (bob.workspace / "alice-secret.txt").exists()


async def test_a_fork_bomb_hits_the_pids_limit_and_the_sandbox_survives(manager, users):
    sandbox = await manager.ensure(*await users("bob"))
    outcome = text(await call(sandbox, "fork_many", n=2000))
    started = int(outcome.split()[1].rstrip(","))
    assert STANDARD.pids - 20 < started < STANDARD.pids, outcome
    assert "Resource temporarily unavailable" in outcome
    assert text(await call(sandbox, "echo", text="still up")) == "still up"


async def test_a_memory_hog_dies_without_harming_anyone_else(manager, users):
    carol, bob = await users("carol"), await users("bob")
    sandbox = await manager.ensure(*carol)
    with pytest.raises((SandboxUnavailable, SandboxRpcError)):
        outcome = await call(sandbox, "hog_memory", mb=4 * STANDARD.memory_bytes // 2**20)
        pytest.fail(f"allocating 4x the limit returned {outcome}")
    # Only carol's sandbox paid; bob's still answers, and carol gets a fresh one.
    assert text(await call(await manager.ensure(*bob), "echo", text="bob here")) == "bob here"
    fresh = await manager.ensure(*carol)
    assert fresh.id != sandbox.id
    assert text(await call(fresh, "echo", text="back")) == "back"
    states = {r["id"]: r["state"] for r in await rows_of(manager.pool, carol[0])}
    assert states == {sandbox.id: "Failed", fresh.id: "Running"}


async def test_racing_ensures_start_one_sandbox(manager, users, backend):
    dave = await users("dave")
    sandboxes = await asyncio.gather(*(manager.ensure(*dave) for _ in range(6)))
    assert len({s.id for s in sandboxes}) == 1
    assert [r["id"] for r in await rows_of(manager.pool, dave[0])] == [sandboxes[0].id]
    assert [c.id for c in await backend.list()].count(sandboxes[0].id) == 1


async def test_a_sandbox_killed_from_outside_fails_the_call_and_is_replaced(manager, users, backend, home):
    erin = await users("erin")
    sandbox = await manager.ensure(*erin)
    in_flight = asyncio.create_task(call(sandbox, "slow", seconds=30))
    await asyncio.sleep(0.5)
    state = json.loads((await backend._run("state", sandbox.id))[1])
    os.kill(state["pid"], signal.SIGKILL)
    with pytest.raises(SandboxUnavailable):
        await asyncio.wait_for(in_flight, 10)
    fresh = await manager.ensure(*erin)
    assert fresh.id != sandbox.id
    assert text(await call(fresh, "echo", text="again")) == "again"
    rows = {r["id"]: r for r in await rows_of(manager.pool, erin[0])}
    assert rows[sandbox.id]["state"] == "Failed" and "stopped unexpectedly" in rows[sandbox.id]["reason"]
    assert rows[fresh.id]["state"] == "Running"
    assert sandbox.id not in {c.id for c in await backend.list()}
    assert not any(sandbox.id in " ".join(argv) for _, argv in _runsc_argvs(backend))


DIRECT_CALLS = """
import json, statistics, subprocess, sys, time
argv = [sys.executable, "-m", "mcp_servers.workspace"]
server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def send(message):
    server.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\\n").encode())
    server.stdin.flush()
init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
send({"id": 0, "method": "initialize", "params": init})
server.stdout.readline()
send({"method": "notifications/initialized"})
times = []
for i in range(1, 221):
    started = time.perf_counter()
    send({"id": i, "method": "ping"})
    server.stdout.readline()
    times.append(time.perf_counter() - started)
server.kill()
print(statistics.median(times[20:]))
"""


async def test_supervisor_overhead_in_gvisor(manager, users):
    """The same request (an MCP ping, answered by the server: transport costs only) sent to the same kind of
    server inside the sandbox directly, and from the gateway's side through the supervisor."""
    sandbox = await manager.ensure(*await users("alice"))
    through, pings = [], []

    async def measure() -> None:
        for _ in range(100):
            started = time.perf_counter()
            await sandbox.client.request("workspace", "ping")
            through.append(time.perf_counter() - started)
            started = time.perf_counter()
            await sandbox.client.ping()
            pings.append(time.perf_counter() - started)

    await measure()
    direct = float(text(await call(sandbox, "run_python", code=DIRECT_CALLS)))
    await measure()
    overhead = statistics.median(through[20:]) - direct
    print(
        f"\nin gVisor, median per call: direct {direct * 1e3:.2f} ms, from the gateway's side "
        f"{statistics.median(through[20:]) * 1e3:.2f} ms, overhead {overhead * 1e3:.2f} ms; "
        f"supervisor ping {statistics.median(pings[20:]) * 1e3:.2f} ms"
    )
    # Every syscall is costly under gVisor's ptrace platform and the samples are noisy (the SDK server
    # alone takes ~5 ms per request here); tests/test_sandbox_supervisor.py holds the supervisor's own
    # overhead to under 1 ms on the host. This catches a data path that waits or serialises.
    assert overhead < 0.010
    results = await asyncio.gather(*(call(sandbox, "echo", text=str(i)) for i in range(60)))
    assert [text(r) for r in results] == [str(i) for i in range(60)]


async def test_a_new_manager_adopts_running_sandboxes_and_cleans_up_the_rest(home, db_pool, backend, manager, users):
    """The gateway dies (no close()); the next one finds its sandboxes, rows and leftovers."""
    alice = await manager.ensure(*await users("alice"))
    dave = await manager.ensure(*await users("dave"))
    counted = int(text(await call(alice, "counter")))
    supervisor_pid = alice.client.supervisor["pid"]
    # Leftovers of a rougher past: a row whose container vanished, and a container with no row.
    await backend.destroy(dave.id)
    frank = await users("frank")
    async with db_pool.connection() as conn:
        await store.insert(conn, "sbx-vanished00", frank[0], backend.name, State.RUNNING, "standard")
    orphan = await _start_bare_sandbox(backend, home, "sbx-orphan0000")
    # The old gateway process is gone: its sockets close, nothing else happens.
    for sandbox in manager.running:
        await sandbox.client.close()

    successor = SandboxManager(home, db_pool, backend, SERVERS)
    await successor.start()
    try:
        adopted = await successor.ensure(*await users("alice"))
        assert adopted.id == alice.id
        assert adopted.client.supervisor["pid"] == supervisor_pid
        assert int(text(await call(adopted, "counter"))) == counted + 1  # the same processes, memory and all
        containers = {c.id for c in await backend.list()}
        assert orphan not in containers and dave.id not in containers
        assert not any(orphan in " ".join(argv) for _, argv in _runsc_argvs(backend))
        states = {r["id"]: (r["state"], r["reason"]) for r in await successor.list(include_ended=True)}
        assert states["sbx-vanished00"][0] == "Failed" and "gone" in states["sbx-vanished00"][1]
        assert states[dave.id][0] == "Failed"
        assert states[alice.id][0] == "Running"
        live = {r["id"] for r in await successor.list()}
        assert live == {s.id for s in successor.running.users()}
    finally:
        await successor.close()
    manager.running.clear()  # all of it now belongs to (and was closed by) the successor

    assert await backend.list() == []
    assert runsc_processes(backend) == []
    rows = await successor.list(include_ended=True)
    assert {r["state"] for r in rows if r["id"] == alice.id} == {"Reclaimed"}
    assert all(r["state"] in ("Reclaimed", "Failed") for r in rows)
    with workspace_of(successor, alice.user_id) as workspace:  # workspaces stay
        assert (workspace / "alice-secret.txt").read_text() == "for alice only"


async def test_reclaim_stops_one_users_sandbox(manager, users, backend):
    gina = await users("gina")
    sandbox = await manager.ensure(*gina)
    await call(sandbox, "write_file", path="/workspace/kept.txt", text="kept")
    assert await manager.reclaim(gina[0]) is True
    assert sandbox.id not in {c.id for c in await backend.list()}
    assert [r["state"] for r in await rows_of(manager.pool, gina[0])] == ["Reclaimed"]
    with workspace_of(manager, gina[0]) as workspace:
        assert (workspace / "kept.txt").read_text() == "kept"
    assert await manager.reclaim(gina[0]) is False


def _runsc_argvs(backend: RunscBackend) -> list[tuple[int, list[str]]]:
    from sandbox.backends.runsc import _runsc_processes

    return _runsc_processes(backend.root)


async def _start_bare_sandbox(backend: RunscBackend, home: Path, sandbox_id: str) -> str:
    """A sandbox started behind the manager's back (as a crash between start and insert would leave)."""
    from sandbox.supervisor.config import SupervisorConfig

    directory = home / "sandboxes" / sandbox_id
    channel = directory / "channel"
    channel.mkdir(parents=True)
    os.chown(channel, SANDBOX_UID, SANDBOX_UID)
    workspace = home / "stray-workspace"
    workspace.mkdir(exist_ok=True)
    config = SupervisorConfig(socket="/run/mcpfleet/gateway.sock", servers=[])
    config.write(channel / "supervisor.json", owner=(SANDBOX_UID, SANDBOX_UID))
    spec = SandboxSpec(sandbox_id, directory, workspace, channel, Limits(), SANDBOX_UID, SANDBOX_UID)
    await backend.start(spec)
    assert await backend.is_alive(sandbox_id)
    return sandbox_id
