"""The backend contract: what every sandbox backend gives a user's sandbox, run against each of them
(runsc, docker) through the SandboxManager. What only one backend does is tested in its own file
(tests/test_sandbox_runsc.py, tests/test_sandbox_docker.py).

Sandboxes take seconds to start, so the tests of one backend share them where they can, and the
ones that break a sandbox on purpose use a user of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.accounts import add_user
from sandbox import store
from sandbox.backends.base import SandboxBackend, SandboxSpec
from sandbox.bundle import SERVER_UIDS
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.factory import sandbox_python
from sandbox.limits import Limits
from sandbox.manager import SANDBOX_GID, SANDBOX_UID, SandboxManager
from sandbox.servers import ServerSpec
from sandbox.store import State
from sandbox.supervisor.config import SupervisorConfig
from tests.conftest import docker_engine_missing
from tests.test_sandbox_supervisor import FIXTURE_SERVER, payload, text

SERVERS = [
    ServerSpec("fixture", ("python", "-c", FIXTURE_SERVER)),
    ServerSpec("workspace", ("python", "-m", "mcp_servers.workspace")),
]
STANDARD = Limits()
"""The `standard` tier's limits, every test user's."""


def _runsc_missing() -> str | None:
    return None if shutil.which("runsc") else "runsc is not installed"


def _backend_param(name: str, missing: str | None) -> object:
    return pytest.param(name, id=name, marks=[pytest.mark.skip(reason=missing)] if missing else [])


BACKENDS = [_backend_param("runsc", _runsc_missing()), _backend_param("docker", docker_engine_missing())]


def make_backend(name: str, home: Path) -> SandboxBackend:
    if name == "docker":
        from sandbox.backends.docker import docker_backend

        return docker_backend(home, sandbox_python())
    from sandbox.backends.runsc import RunscBackend

    return RunscBackend(home / "runsc", cgroup_parent="/mcpfleet-test")


@pytest.fixture(scope="module", params=BACKENDS)
def fleet_home(request, home) -> Path:
    """A fleet home per backend: a manager's recovery removes every sandbox dir it has no row for."""
    directory = home / request.param
    directory.mkdir()
    return directory


@pytest.fixture(scope="module")
def backend(request, fleet_home):
    return make_backend(fleet_home.name, fleet_home)


@contextlib.asynccontextmanager
async def managed(home: Path, db_pool, backend: SandboxBackend, servers=None):
    """A started SandboxManager on `backend`; closed after, and every container it left removed."""
    manager = SandboxManager(home, db_pool, backend, SERVERS if servers is None else servers, start_timeout=120)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.close()
        for container in await backend.list():
            await backend.destroy(container.id)


@pytest.fixture(scope="module")
async def manager(fleet_home, db_pool, backend):
    async with managed(fleet_home, db_pool, backend) as manager:
        yield manager


@pytest.fixture(scope="module")
def users(db_pool, backend):
    ids: dict[str, int] = {}
    tenant = f"contract-{backend.name}-{os.getpid()}"

    async def user(name: str) -> tuple[int, str, str]:
        if name not in ids:
            async with db_pool.connection() as conn:
                ids[name] = (await add_user(conn, name, tenant=tenant)).user_id
        return ids[name], tenant, name

    return user


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


async def start_bare_sandbox(backend: SandboxBackend, home: Path, sandbox_id: str) -> str:
    """A sandbox started behind the manager's back (as a crash between start and insert would leave)."""
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


async def test_a_tool_call_runs_in_gvisor_as_an_unprivileged_user(manager, users, backend):
    alice = await users("alice")
    started = time.perf_counter()
    sandbox = await manager.ensure(*alice)
    who = payload(await call(sandbox, "whoami"))
    print(f"\n{backend.name}: cold start to first tool result: {time.perf_counter() - started:.2f} s")
    assert who["release"] == "4.4.0"  # gVisor's, not the host's
    assert who["release"] != os.uname().release
    assert who["uid"] >= SERVER_UIDS and who["gid"] == SANDBOX_GID  # a uid of its own, the workspace's group
    assert who["cwd"] == who["home"] == "/workspace"
    assert sandbox.id.startswith("sbx-")
    # It started with every CPU of the host; now that its servers are up, it has its own share.
    assert backend.cpu_quota_us(sandbox.id) == STANDARD.cpu_quota_us
    assert (await backend.memory_bytes(sandbox.id) or 0) > 10 * 2**20
    assert sandbox.id in {c.id for c in await backend.list() if c.status == "running"}
    [row] = [r for r in await manager.list() if r["user_id"] == alice[0]]
    assert (row["id"], row["state"], row["user"], row["tenant"]) == (sandbox.id, "Running", "alice", alice[1])
    assert row["created_at"] <= row["last_used_at"]


async def test_the_workspace_server_writes_to_the_users_workspace(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    catalog = await sandbox.client.catalog()
    assert catalog["workspace"]["state"] == "ready"
    await call(sandbox, "write_file", server="workspace", path="notes/hello.txt", content="hi from alice")
    on_host = sandbox.workspace / "notes" / "hello.txt"
    assert on_host.read_text() == "hi from alice"
    assert on_host.stat().st_uid >= SERVER_UIDS and on_host.stat().st_gid == SANDBOX_GID
    assert on_host.stat().st_mode & 0o060 == 0o060  # the other servers may change it too
    assert "hi from alice" in text(await call(sandbox, "read_file", server="workspace", path="notes/hello.txt"))


async def test_no_network_not_even_the_hosts_loopback(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    accepted = []
    listener = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        # The host's loopback, the internet, and Docker's default bridge.
        for host in ("127.0.0.1", "1.1.1.1", "172.17.0.1"):
            outcome = text(await call(sandbox, "connect", host=host, port=port if host == "127.0.0.1" else 53))
            assert outcome.startswith("failed"), (host, outcome)
    finally:
        listener.close()
    assert accepted == []


async def test_root_is_read_only_and_the_project_is_not_visible(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    assert text(await call(sandbox, "write_file", path="/etc/passwd", text="x")).startswith("Error")
    assert "error" in text(await call(sandbox, "read_file", path="/work/main/pyproject.toml"))
    assert "error" in text(await call(sandbox, "read_file", path="/opt/mcpfleet/lib/../../../work/main/pyproject.toml"))
    assert "error" in text(await call(sandbox, "read_file", path=str(manager.home / "workspaces")))
    assert text(await call(sandbox, "write_file", path="/tmp/scratch", text="fine")) == "written"
    # The servers' environment was in the supervisor's config; it is read once and gone.
    assert "error" in text(await call(sandbox, "read_file", path="/run/mcpfleet/supervisor.json"))
    assert not (sandbox.layout.config).exists()


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
    # A server runs under a uid of its own, which may not even enter the channel dir (the sandbox's
    # uid's, the supervisor's as root); the token it lacks would have it closed on all the same.
    outcome = text(await call(sandbox, "run_python", code=IMPOSTOR)).strip()
    assert outcome.endswith("PermissionError: [Errno 13] Permission denied"), outcome
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
    assert text(await call(await manager.ensure(*await users("alice")), "echo", text="me too")) == "me too"


async def test_a_memory_hog_dies_without_harming_anyone_else(manager, users, backend):
    carol, bob = await users("carol"), await users("bob")
    sandbox = await manager.ensure(*carol)
    with pytest.raises((SandboxUnavailable, SandboxRpcError)):
        outcome = await call(sandbox, "hog_memory", mb=4 * STANDARD.memory_bytes // 2**20)
        pytest.fail(f"allocating 4x the limit returned {outcome}")
    # Only carol's sandbox paid; bob's still answers, and carol gets a fresh one.
    assert text(await call(await manager.ensure(*bob), "echo", text="bob here")) == "bob here"
    # The channel breaks as the kill begins; the backend may report the sandbox gone a moment later.
    for _ in range(100):
        if not await backend.is_alive(sandbox.id):
            break
        await asyncio.sleep(0.1)
    assert not await backend.is_alive(sandbox.id)
    fresh = await manager.ensure(*carol)
    assert fresh.id != sandbox.id
    assert text(await call(fresh, "echo", text="back")) == "back"
    states = {r["id"]: r["state"] for r in await rows_of(manager.pool, carol[0])}
    assert states == {sandbox.id: "Failed", fresh.id: "Running"}


ORPHAN = """
import os, time
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(1)  # outlives its parent, so it is re-parented, then exits and needs a reaper
        print("parent", os.getppid(), flush=True)
        os._exit(0)
    print("pid", grandchild, flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""

GONE = """
import time
deadline, state = time.monotonic() + 30, "?"
while time.monotonic() < deadline:
    try:
        state = open("/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        print("reaped")
        break
    time.sleep(0.1)
else:
    print("left in state", state)
"""


async def test_an_orphaned_grandchild_is_reaped_by_pid_1_not_left_a_zombie(manager, users):
    """A server's grandchild whose parent exits goes to PID 1 (tini, or the supervisor's own init
    without it); when it exits, PID 1 must wait for it, or every such process stays a zombie, holding
    a pid of the sandbox's limited few, until the sandbox ends."""
    sandbox = await manager.ensure(*await users("olga"))
    seen = dict(line.split() for line in text(await call(sandbox, "run_python", code=ORPHAN)).splitlines())
    assert seen["parent"] == "1", seen  # re-parented to PID 1, not kept by a subreaper
    assert text(await call(sandbox, "run_python", code=GONE.format(pid=seen["pid"]))).strip() == "reaped"


FRESH_PYC = """
import importlib.util, os, struct, sandbox.supervisor.main as module
source = os.stat(module.__file__)
for level in ("", 2):  # the servers' import, and the supervisor's own (`config.SUPERVISOR_FLAGS`: -OO)
    with open(importlib.util.cache_from_source(module.__file__, optimization=level), "rb") as f:
        head = f.read(16)
    print(head[:4] == importlib.util.MAGIC_NUMBER, struct.unpack("<II", head[8:16]) == (int(source.st_mtime), source.st_size))
"""


async def test_the_supervisors_modules_are_byte_compiled_for_the_sandboxs_python(manager, users):
    """The product's packages are read-only inside, so a sandbox cannot write their .pyc: the host
    compiles them (`sandbox.bundle.compile_packages`), or every supervisor compiles its modules from
    source at its start, slower and holding more memory."""
    sandbox = await manager.ensure(*await users("alice"))
    assert text(await call(sandbox, "run_python", code=FRESH_PYC)).split() == ["True"] * 4


async def test_racing_ensures_start_one_sandbox(manager, users, backend):
    dave = await users("dave")
    sandboxes = await asyncio.gather(*(manager.ensure(*dave) for _ in range(6)))
    assert len({s.id for s in sandboxes}) == 1
    assert [r["id"] for r in await rows_of(manager.pool, dave[0])] == [sandboxes[0].id]
    assert [c.id for c in await backend.list()].count(sandboxes[0].id) == 1


async def test_hibernation_keeps_memory_and_the_channel_comes_back(manager, users, backend):
    assert backend.keeps_memory
    alice = await users("alice")
    sandbox = await manager.ensure(*alice)
    first = int(text(await call(sandbox, "counter")))
    await call(sandbox, "write_file", path="/tmp/kept", text="in memory")
    started = time.perf_counter()
    assert await manager.hibernate(alice[0]) is True
    saved = time.perf_counter()
    assert not await backend.is_alive(sandbox.id)
    assert {r["id"]: r["state"] for r in await rows_of(manager.pool, alice[0])}[sandbox.id] == "Hibernated"
    resumed = await manager.ensure(*alice)
    assert resumed.id == sandbox.id
    assert int(text(await call(resumed, "counter"))) == first + 1  # the same server process, memory and all
    print(f"\n{backend.name}: hibernate {saved - started:.2f} s, resume to first result {time.perf_counter() - saved:.2f} s")
    assert text(await call(resumed, "read_file", path="/tmp/kept")) == "in memory"
    assert "hi from alice" in text(await call(resumed, "read_file", server="workspace", path="notes/hello.txt"))
    assert backend.cpu_quota_us(sandbox.id) == STANDARD.cpu_quota_us
    assert {r["id"]: r["state"] for r in await rows_of(manager.pool, alice[0])}[sandbox.id] == "Running"


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


async def test_destroy_is_idempotent_and_kill_strays_spares_what_is_kept(fleet_home, backend, manager):
    stray = await start_bare_sandbox(backend, fleet_home, "sbx-stray00001")
    kept = await start_bare_sandbox(backend, fleet_home, "sbx-kept000001")
    live = {s.id for s in manager.running}
    assert backend.kill_strays(keep={kept} | live) >= 1
    assert not await backend.is_alive(stray)
    assert await backend.is_alive(kept)
    assert all([await backend.is_alive(sandbox_id) for sandbox_id in live])
    for sandbox_id in (stray, kept, kept):
        await backend.destroy(sandbox_id, grace=2)
    assert not {stray, kept} & {c.id for c in await backend.list()}


async def test_a_new_manager_adopts_running_sandboxes_and_cleans_up_the_rest(fleet_home, db_pool, backend, manager, users):
    """The gateway dies (no close()); the next one finds its sandboxes, rows and leftovers."""
    alice = await manager.ensure(*await users("alice"))
    dave = await manager.ensure(*await users("dave"))
    counted = int(text(await call(alice, "counter")))
    supervisor_pid = alice.client.supervisor["pid"]
    # Leftovers of a rougher past: a row whose container vanished, a row with no container at all,
    # and a container with no row.
    await backend.destroy(dave.id)
    frank = await users("frank")
    async with db_pool.connection() as conn:
        await store.insert(conn, f"sbx-vanished-{backend.name}", frank[0], backend.name, State.RUNNING, "standard")
    orphan = await start_bare_sandbox(backend, fleet_home, "sbx-orphan0000")
    # The old gateway process is gone: its sockets close, nothing else happens.
    await manager.stop_background()
    for sandbox in manager.running:
        await sandbox.client.close()

    successor = SandboxManager(fleet_home, db_pool, backend, SERVERS)
    await successor.start()
    try:
        adopted = await successor.ensure(*await users("alice"))
        assert adopted.id == alice.id
        assert adopted.client.supervisor["pid"] == supervisor_pid
        assert int(text(await call(adopted, "counter"))) == counted + 1  # the same processes, memory and all
        assert (adopted.workspace / "alice-secret.txt").read_text() == "for alice only"
        containers = {c.id for c in await backend.list()}
        assert orphan not in containers and dave.id not in containers
        assert containers == {s.id for s in successor.running.users()}
        states = {r["id"]: (r["state"], r["reason"]) for r in await successor.list(include_ended=True)}
        assert states[f"sbx-vanished-{backend.name}"][0] == "Failed"
        assert "gone" in states[f"sbx-vanished-{backend.name}"][1]
        assert states[dave.id][0] == "Failed"
        assert states[alice.id][0] == "Running"
    finally:
        await successor.close()
    manager.running.clear()  # all of it now belongs to (and was closed by) the successor

    assert await backend.list() == []
    assert backend.kill_strays(keep=set()) == 0  # nothing of any sandbox runs
    rows = [r for r in await successor.list(include_ended=True) if r["id"] == alice.id]
    assert {r["state"] for r in rows} == {"Reclaimed"}
    with workspace_of(successor, alice.user_id) as workspace:  # workspaces stay
        assert (workspace / "alice-secret.txt").read_text() == "for alice only"
