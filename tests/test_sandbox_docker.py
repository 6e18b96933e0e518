"""What only the Docker backend does, against the real Engine (scripts/docker.sh starts it): how the
container is configured, what the Engine reports, and that fleets sharing an Engine keep apart.
What every backend does is tests/test_sandbox_backends.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import docker
import pytest

from core.accounts import add_user
from sandbox.backends.docker import FLEET_LABEL, LABEL, DockerBackend, docker_backend
from sandbox.bundle import SERVER_UIDS, SUPERVISOR_CAPS
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.factory import sandbox_python
from sandbox.manager import SANDBOX_UID, SandboxManager
from sandbox.servers import ServerSpec
from tests.test_sandbox_backends import STANDARD, call, managed, start_bare_sandbox
from tests.test_sandbox_supervisor import FIXTURE_SERVER, text


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
    async with managed(home, db_pool, backend, SERVERS) as manager:
        yield manager


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


async def test_the_container_is_locked_down(manager, users, backend):
    sandbox = await manager.ensure(*await users("alice"))
    out = await sh(sandbox, "cat /proc/version; dmesg; id -u; id -g")
    assert out["exit_code"] == 0, out
    assert "gVisor" in out["stdout"]  # its kernel log is gVisor's own
    # The exec server runs under a uid of its own, in the workspace's group (sandbox.bundle.SERVER_UIDS).
    uid, gid = (int(v) for v in out["stdout"].split()[-2:])
    assert uid >= SERVER_UIDS and gid == SANDBOX_UID, out
    attrs = ENGINE.api.inspect_container(sandbox.id)
    host = attrs["HostConfig"]
    assert (host["Runtime"], host["NetworkMode"]) == ("runsc", "none")
    # Not read-only to the engine: runsc keeps the root in memory instead (scripts/docker.sh), and nothing inside may write it.
    assert "--overlay2=root:memory" in ENGINE.info()["Runtimes"]["runsc"]["runtimeArgs"]
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    # The supervisor is gVisor's root with only what starting servers under their uids needs; they get none.
    assert attrs["Config"]["User"] == "0:0"
    assert sorted(host["CapAdd"]) == sorted(c.removeprefix("CAP_") for c in SUPERVISOR_CAPS)
    caps = (await sh(sandbox, "grep CapEff /proc/self/status"))["stdout"].split()[-1]
    assert int(caps, 16) == 0, caps
    assert host["Memory"] == STANDARD.memory_bytes
    assert "eth0" not in (await sh(sandbox, "cat /proc/net/dev"))["stdout"]
    # The root is in memory (the runtime's --overlay2=root:memory): `df /` shows nothing of the host's disk.
    stat = os.statvfs(manager.home)
    root = (await sh(sandbox, "df -k -P / | tail -n 1"))["stdout"].split()
    assert root[-1] == "/" and int(root[1]) != stat.f_blocks * stat.f_frsize // 1024, root
    assert "wrote" not in (await sh(sandbox, "touch /x /etc/x && echo wrote"))["stdout"]


async def test_the_engine_reports_a_memory_hog_killed(manager, users, backend):
    sandbox = await manager.ensure(*await users("carol"))
    with pytest.raises((SandboxUnavailable, SandboxRpcError)):
        outcome = await call(sandbox, "hog_memory", mb=4 * STANDARD.memory_bytes // 2**20)
        pytest.fail(f"allocating 4x the limit returned {outcome}")
    # The channel breaks as the kill begins; the Engine reports the container exited a moment later.
    for _ in range(100):
        if not await backend.is_alive(sandbox.id):
            break
        await asyncio.sleep(0.1)
    attrs = ENGINE.api.inspect_container(sandbox.id)["State"]
    assert attrs["OOMKilled"] or attrs["ExitCode"] != 0, attrs


async def test_a_hibernated_sandbox_is_a_stopped_container_holding_its_checkpoint(manager, users, backend):
    alice = await users("alice")
    sandbox = await manager.ensure(*alice)
    assert await manager.hibernate(alice[0]) is True
    assert [c.status for c in await backend.list() if c.id == sandbox.id] == ["stopped"]
    resumed = await manager.ensure(*alice)
    assert resumed.id == sandbox.id
    assert text(await call(resumed, "echo", text="back")) == "back"


async def test_kill_strays_leaves_another_fleets_containers_alone(home, backend, manager):
    other_fleet = DockerBackend("another-fleet", python=backend.python)
    ours = await _start_labelled(backend, home, "sbx-stray00001")
    theirs = await _start_labelled(other_fleet, home, "sbx-theirs0001")
    try:
        assert {c.id for c in await other_fleet.list()} == {theirs}
        container_id = ENGINE.containers.get(ours).id
        assert runsc_processes_of(container_id)
        assert backend.kill_strays(keep={s.id for s in manager.running}) == 1
        assert ours not in {c.id for c in await backend.list()}
        assert await other_fleet.is_alive(theirs)
        assert runsc_processes_of(container_id) == []
    finally:
        await other_fleet.destroy(theirs)
    assert not {c.name for c in ENGINE.containers.list(all=True)} & {ours, theirs}


async def _start_labelled(backend: DockerBackend, home: Path, sandbox_id: str) -> str:
    """A sandbox started behind the manager's back, labelled with its id and its fleet."""
    await start_bare_sandbox(backend, home, sandbox_id)
    labels = ENGINE.containers.get(sandbox_id).labels
    assert labels[LABEL] == sandbox_id and labels[FLEET_LABEL] == backend.fleet
    return sandbox_id
