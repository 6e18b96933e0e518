"""Sandboxes as Docker containers under gVisor: the real Engine (scripts/docker.sh starts it), the SandboxManager.

The tests share sandboxes where they can; the ones that break a sandbox on purpose use a user of their own.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import docker
import pytest

from gateway.accounts import add_user
from gateway.sandboxes import sandbox_python
from sandbox.backends.base import SandboxSpec
from sandbox.backends.docker import FLEET_LABEL, LABEL, DockerBackend, docker_backend
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.limits import Limits
from sandbox.manager import SANDBOX_UID, SandboxManager
from sandbox.servers import ServerSpec
from sandbox.supervisor.config import SupervisorConfig
from tests.test_sandbox_runsc import STANDARD, call, rows_of
from tests.test_sandbox_supervisor import FIXTURE_SERVER, payload, text


def _engine() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except docker.errors.DockerException:
        return None


ENGINE = _engine()
pytestmark = pytest.mark.skipif(ENGINE is None, reason="no Docker Engine answers (scripts/docker.sh starts one)")

SERVERS = [
    ServerSpec("fixture", ("python", "-c", FIXTURE_SERVER)),
    ServerSpec("workspace", ("python", "-m", "mcp_servers.workspace")),
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
]
TENANT = f"docker-{os.getpid()}"


@pytest.fixture(scope="module")
def backend(home):
    return docker_backend(home, sandbox_python())


@pytest.fixture(scope="module")
async def manager(home, db_pool, backend):
    manager = SandboxManager(home, db_pool, backend, SERVERS, start_timeout=120)
    await manager.start()
    yield manager
    await manager.close()
    for container in await backend.list():
        await backend.destroy(container.id)


@pytest.fixture(scope="module")
def users(db_pool):
    ids: dict[str, int] = {}

    async def user(name: str) -> tuple[int, str, str]:
        if name not in ids:
            async with db_pool.connection() as conn:
                ids[name] = (await add_user(conn, name, tenant=TENANT)).user_id
        return ids[name], TENANT, name

    return user


async def sh(sandbox, command: str) -> dict:
    return (await call(sandbox, "run", server="exec", command=command, timeout_s=30))["structuredContent"]


def runsc_processes_of(container_id: str) -> list[int]:
    """Host processes of a container's gVisor sandbox (its sentry and gofer name the container in argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and argv[0].startswith(b"runsc") and any(container_id.encode() in a for a in argv):
            found.append(int(entry.name))
    return found


async def test_a_workspace_tool_call_runs_in_gvisor_as_an_unprivileged_user(manager, users, backend):
    alice = await users("alice")
    started = time.perf_counter()
    sandbox = await manager.ensure(*alice)
    await call(sandbox, "write_file", server="workspace", path="notes/hello.txt", content="hi from alice")
    print(f"\ncold start to first tool result: {time.perf_counter() - started:.2f} s")
    assert (sandbox.workspace / "notes" / "hello.txt").read_text() == "hi from alice"
    assert (sandbox.workspace / "notes" / "hello.txt").stat().st_uid == SANDBOX_UID
    assert "hi from alice" in text(await call(sandbox, "read_file", server="workspace", path="notes/hello.txt"))

    out = await sh(sandbox, "cat /proc/version; dmesg; id -u; id -g")
    assert out["exit_code"] == 0, out
    assert "gVisor" in out["stdout"]  # its kernel log is gVisor's own
    assert out["stdout"].split()[-2:] == [str(SANDBOX_UID), str(SANDBOX_UID)]
    assert payload(await call(sandbox, "whoami"))["release"] != os.uname().release

    attrs = ENGINE.api.inspect_container(sandbox.id)
    host = attrs["HostConfig"]
    assert (host["Runtime"], host["NetworkMode"]) == ("runsc", "none")
    # Not read-only to the engine: runsc keeps the root in memory instead (scripts/docker.sh), and nothing inside may write it.
    assert "--overlay2=root:memory" in ENGINE.info()["Runtimes"]["runsc"]["runtimeArgs"]
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert attrs["Config"]["User"] == f"{SANDBOX_UID}:{SANDBOX_UID}"
    assert host["Memory"] == STANDARD.memory_bytes
    # It started with every CPU of the host; now that its servers are up, it has its own share.
    assert backend.cpu_quota_us(sandbox.id) == STANDARD.cpu_quota_us
    assert (await backend.memory_bytes(sandbox.id) or 0) > 10 * 2**20
    [row] = [r for r in await manager.list() if r["user_id"] == alice[0]]
    assert (row["id"], row["state"]) == (sandbox.id, "Running")
    assert sandbox.id in {c.id for c in await backend.list() if c.status == "running"}


async def test_no_network_not_even_the_hosts_loopback(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    accepted = []
    listener = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        for host in ("127.0.0.1", "1.1.1.1", "172.17.0.1"):
            outcome = text(await call(sandbox, "connect", host=host, port=port if host == "127.0.0.1" else 53))
            assert outcome.startswith("failed"), (host, outcome)
    finally:
        listener.close()
    assert accepted == []
    interfaces = (await sh(sandbox, "cat /proc/net/dev"))["stdout"]
    assert "eth0" not in interfaces


async def test_root_is_read_only_and_the_project_is_not_visible(manager, users):
    sandbox = await manager.ensure(*await users("alice"))
    assert text(await call(sandbox, "write_file", path="/etc/passwd", text="x")).startswith("Error")
    assert "error" in text(await call(sandbox, "read_file", path="/work/main/pyproject.toml"))
    assert "error" in text(await call(sandbox, "read_file", path=str(manager.home / "workspaces")))
    assert text(await call(sandbox, "write_file", path="/tmp/scratch", text="fine")) == "written"
    assert "error" in text(await call(sandbox, "read_file", path="/run/mcpfleet/supervisor.json"))
    # The root is in memory (the runtime's --overlay2=root:memory): `df /` shows nothing of the host's disk.
    host = os.statvfs(manager.home)
    root = (await sh(sandbox, "df -k -P / | tail -n 1"))["stdout"].split()
    assert root[-1] == "/" and int(root[1]) != host.f_blocks * host.f_frsize // 1024, root
    assert "wrote" not in (await sh(sandbox, "touch /x /etc/x && echo wrote"))["stdout"]


async def test_two_users_see_only_their_own_workspace(manager, users):
    alice, bob = await asyncio.gather(manager.ensure(*await users("alice")), manager.ensure(*await users("bob")))
    assert alice.id != bob.id and alice.workspace != bob.workspace
    await call(alice, "write_file", path="/workspace/alice-secret.txt", text="for alice only")
    assert "alice-secret.txt" not in payload(await call(bob, "whoami"))["workspace"]
    assert "error" in text(await call(bob, "read_file", path="/workspace/alice-secret.txt"))
    assert "error" in text(await call(bob, "read_file", path=str(alice.workspace / "alice-secret.txt")))
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
    assert text(await call(await manager.ensure(*bob), "echo", text="bob here")) == "bob here"
    # The channel breaks as the kill begins; the Engine reports the container exited a moment later.
    for _ in range(100):
        if not await backend.is_alive(sandbox.id):
            break
        await asyncio.sleep(0.1)
    assert not await backend.is_alive(sandbox.id)
    attrs = ENGINE.api.inspect_container(sandbox.id)["State"]
    assert attrs["OOMKilled"] or attrs["ExitCode"] != 0, attrs


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
    assert [c.status for c in await backend.list() if c.id == sandbox.id] == ["stopped"]
    assert {r["id"]: r["state"] for r in await rows_of(manager.pool, alice[0])}[sandbox.id] == "Hibernated"
    resumed = await manager.ensure(*alice)
    assert resumed.id == sandbox.id
    assert int(text(await call(resumed, "counter"))) == first + 1  # the same server process, memory and all
    print(f"\nhibernate {saved - started:.2f} s, resume to first result {time.perf_counter() - saved:.2f} s")
    assert text(await call(resumed, "read_file", path="/tmp/kept")) == "in memory"
    assert "hi from alice" in text(await call(resumed, "read_file", server="workspace", path="notes/hello.txt"))
    assert backend.cpu_quota_us(sandbox.id) == STANDARD.cpu_quota_us
    assert {r["id"]: r["state"] for r in await rows_of(manager.pool, alice[0])}[sandbox.id] == "Running"


async def test_a_new_manager_adopts_running_sandboxes_and_cleans_up_the_rest(home, db_pool, backend, manager, users):
    """The gateway dies (no close()); the next one finds its sandboxes, rows and leftovers."""
    alice = await manager.ensure(*await users("alice"))
    bob = await manager.ensure(*await users("bob"))
    counted = int(text(await call(alice, "counter")))
    await backend.destroy(bob.id)  # a row whose container vanished
    orphan = await _start_bare_sandbox(backend, home, "sbx-orphan0000")  # a container with no row
    for sandbox in manager.running:
        await sandbox.client.close()

    successor = SandboxManager(home, db_pool, backend, SERVERS)
    await successor.start()
    try:
        adopted = await successor.ensure(*await users("alice"))
        assert adopted.id == alice.id
        assert int(text(await call(adopted, "counter"))) == counted + 1
        assert (adopted.workspace / "alice-secret.txt").read_text() == "for alice only"
        assert {c.id for c in await backend.list()} == {s.id for s in successor.running.users()}
        assert orphan not in {c.name for c in ENGINE.containers.list(all=True)}
        states = {r["id"]: r["state"] for r in await successor.list(include_ended=True)}
        assert states[bob.id] == "Failed" and states[alice.id] == "Running"
    finally:
        await successor.close()
    manager.running.clear()  # all of it now belongs to (and was closed by) the successor

    assert await backend.list() == []
    assert {r["state"] for r in await rows_of(db_pool, (await users("alice"))[0])} <= {"Reclaimed", "Failed"}


async def test_destroy_and_kill_strays_leave_no_container_of_this_fleet_only(home, backend, manager):
    other_fleet = DockerBackend("another-fleet", python=backend.python)
    ours = await _start_bare_sandbox(backend, home, "sbx-stray00001")
    kept = await _start_bare_sandbox(backend, home, "sbx-kept000001")
    theirs = await _start_bare_sandbox(other_fleet, home, "sbx-theirs0001")
    try:
        assert {c.id for c in await backend.list()} == {ours, kept}
        assert {c.id for c in await other_fleet.list()} == {theirs}
        container_id = ENGINE.containers.get(ours).id
        assert runsc_processes_of(container_id)
        assert backend.kill_strays(keep={kept}) == 1
        assert {c.id for c in await backend.list()} == {kept}
        assert await other_fleet.is_alive(theirs)
        assert runsc_processes_of(container_id) == []
        await backend.destroy(kept, grace=2)
        await backend.destroy(kept)  # idempotent
        assert await backend.list() == []
    finally:
        await other_fleet.destroy(theirs)
    assert not {c.name for c in ENGINE.containers.list(all=True)} & {ours, kept, theirs}


async def _start_bare_sandbox(backend: DockerBackend, home: Path, sandbox_id: str) -> str:
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
    labels = ENGINE.containers.get(sandbox_id).labels
    assert labels[LABEL] == sandbox_id and labels[FLEET_LABEL] == backend.fleet
    return sandbox_id
