"""The fork server (sandbox/supervisor/zygote.py, forks.py): the built-in servers forked from one
Python that imported the `mcp` SDK once, each still a stranger to its neighbours.

In a real gVisor sandbox (both runsc builds this machine has), two exec servers, both forked: the
victim holds a secret, the other attacks it. Each forked server runs under its own uid with no
capability, its own umask and private dir; its secret reached it and nothing else (not the fork
server, not a neighbour's view of its environ or memory); it survives hibernation. On the host,
the supervisor restarts a forked server that dies, and every forked server when the fork server dies.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.accounts import add_user
from sandbox.backends.runsc import RunscBackend
from sandbox.bundle import SERVER_UIDS
from sandbox.client import SupervisorClient
from sandbox.servers import FORK_SERVER_SETTING, ServerSpec, fork_modules
from sandbox.supervisor.config import PYTHON_FLAGS, ServerConfig, SupervisorConfig
from sandbox.supervisor.forks import ForkServer
from tests.test_attacks_uids import RUNSC_BUILDS
from tests.test_sandbox_backends import call, managed
from tests.test_sandbox_supervisor import RunningSupervisor, wait_for_state

SECRET = "forked-secret-7d2e9b41"

SERVERS = [
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
    ServerSpec("victim", ("python", "-m", "mcp_servers.exec"), server="test/victim", secret_names=("VICTIM_TOKEN",),
               secrets={"VICTIM_TOKEN": SECRET}),
]

# Run by each exec server: who the server running it is (the shell's parent), and its parent.
SELF = r'''
import json, os, sys
server = os.getppid()
def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
own = status(server)
parent = int(own["PPid"])
with open(f"/proc/{parent}/cmdline", "rb") as f:
    parent_cmdline = f.read().replace(b"\0", b" ").decode()
print(json.dumps({
    "pid": server, "uid": own["Uid"].split(), "gid": own["Gid"].split(), "groups": own.get("Groups", "").split(),
    "caps": {k: v for k, v in own.items() if k.startswith("Cap") and k != "CapBnd"}, "name": own["Name"],
    "parent": parent, "parent_cmdline": parent_cmdline, "umask": oct(os.umask(0o077)),
    "tmpdir": os.environ.get("TMPDIR"), "tmpdir_mode": oct(os.stat(os.environ["TMPDIR"]).st_mode & 0o7777),
    "has_secret": os.environ.get("VICTIM_TOKEN") == sys.argv[1] + sys.argv[2],
}))
'''

ATTACK = r'''
import json, os, sys
victim, zygote = int(sys.argv[1]), int(sys.argv[2])
secret = (sys.argv[3] + sys.argv[4]).encode()  # in halves: the whole is in no command line
out = {}

def attempt(name, action):
    try:
        out[name] = repr(action())
    except OSError as exc:
        out[name] = f"refused: {exc.strerror}"

def read(path):
    with open(path, "rb") as f:
        return f.read()

def memory(pid):
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(0x400000)
        return f.read(64)

for who, pid in (("victim", victim), ("zygote", zygote)):
    attempt(f"{who}_environ", lambda: secret in read(f"/proc/{pid}/environ"))
    attempt(f"{who}_mem", lambda: memory(pid))
seen = []
for other in filter(str.isdigit, os.listdir("/proc")):
    for name in ("environ", "cmdline"):
        try:
            if secret in read(f"/proc/{other}/{name}"):
                seen.append(f"{other}/{name}")
        except OSError:
            pass
out["secret_seen_in"] = seen
print(json.dumps(out))
'''


def run(code: str) -> str:
    """Python code as the exec server's command, executed by its shell: the server is its parent."""
    return f"exec python -c {shlex.quote(code)}"


async def shell(sandbox, server: str, command: str) -> dict:
    result = await call(sandbox, "run", server=server, command=command)
    assert result["structuredContent"]["exit_code"] == 0, result["structuredContent"]
    return json.loads(result["structuredContent"]["stdout"])


def test_the_built_in_servers_are_forked_unless_turned_off(monkeypatch):
    assert fork_modules() == ["mcp_servers.workspace", "mcp_servers.exec", "mcp_servers.conformance"]
    monkeypatch.setenv(FORK_SERVER_SETTING, "0")
    assert fork_modules() == []


def test_the_fork_server_may_import_each_forked_modules_main():
    """It does (sandbox/supervisor/zygote.py, `preload`): their `main()` must run only as __main__."""
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m + '.__main__')\nprint('imported')"
    done = subprocess.run([sys.executable, "-c", code, *fork_modules()], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "imported\n"), done.stderr


def test_what_is_forked_and_what_is_executed():
    forks = ForkServer(["mcp_servers.exec"])
    python = [sys.executable, *PYTHON_FLAGS]
    assert forks.form([*python, "-m", "mcp_servers.exec", "--x"], {}) == ["-m", "mcp_servers.exec", "--x"]
    # Another module, a script, code, no flags, another import path or interpreter: executed.
    assert forks.form([*python, "-m", "mcp_servers.workspace"], {}) is None
    assert forks.form([*python, "server.py"], {}) is None
    assert forks.form([*python, "-c", "pass"], {}) is None
    assert forks.form([sys.executable, "-m", "mcp_servers.exec"], {}) is None
    assert forks.form([*python, "-m", "mcp_servers.exec"], {"PYTHONPATH": "/opt/tools/layer"}) is None
    assert forks.form(["/bin/sh", *PYTHON_FLAGS, "-m", "mcp_servers.exec"], {}) is None
    assert ForkServer([]).form([*python, "-m", "mcp_servers.exec"], {}) is None


def test_warming_starts_the_fork_server_and_returns_once_it_imported_what_it_may_fork():
    """What a sandbox template does before its checkpoint (`sandbox.templates`)."""
    forks = ForkServer(["mcp_servers.exec", "mcp_servers.workspace"], preload=[])
    try:
        assert not forks.preloaded.is_set()
        # Only modules it may fork are preloaded: another is left out.
        assert forks.warm(["mcp_servers.exec", "not.a.fork.module"], timeout=300)
        assert forks.preload == ["mcp_servers.exec"]
        assert forks.warm(["mcp_servers.workspace"], timeout=5)  # running already: as it was started
        assert forks.preload == ["mcp_servers.exec"]
    finally:
        forks.close()


@pytest.mark.parametrize(("runsc", "platform"), RUNSC_BUILDS)
async def test_a_forked_server_is_itself_and_its_neighbour_cannot_read_it(runsc, platform, home, db_pool, monkeypatch):
    monkeypatch.delenv(FORK_SERVER_SETTING, raising=False)
    backend = RunscBackend(home / f"runsc-forks-{platform}", runsc=runsc, platform=platform, cgroup_parent="/mcpfleet-test")
    async with managed(home, db_pool, backend, SERVERS) as manager:
        tenant = f"forks-{os.getpid()}"
        async with db_pool.connection() as conn:
            user = await add_user(conn, f"forks-{platform}", tenant=tenant)
        sandbox = await manager.ensure(user.user_id, tenant, f"forks-{platform}")
        halves = f"{SECRET[:8]} {SECRET[8:]}"

        victim = await shell(sandbox, "victim", f"{run(SELF)} {halves}")
        attacker = await shell(sandbox, "exec", f"{run(SELF)} {halves}")
        for me, other in ((victim, attacker), (attacker, victim)):
            # Forked from the fork server, not executed: its parent is the fork server.
            assert "sandbox.supervisor.zygote" in me["parent_cmdline"], me
            assert me["parent"] == other["parent"]
            uid = int(me["uid"][0])
            assert uid >= SERVER_UIDS and me["uid"] == [str(uid)] * 4 and uid != int(other["uid"][0])
            assert me["gid"] == [me["gid"][0]] * 4 and me["groups"] in ([], [me["gid"][0]])
            assert {"CapInh", "CapPrm", "CapEff"} <= set(me["caps"]), me["caps"]  # CapAmb too, from gVisor 2023
            assert set(me["caps"].values()) == {"0000000000000000"}, me["caps"]
            assert me["umask"] == "0o7"
            assert me["tmpdir_mode"] == "0o700"
        assert victim["name"] == "victim" and victim["tmpdir"] == "/tmp/.servers/victim"
        assert victim["has_secret"] and not attacker["has_secret"]

        seen = await shell(sandbox, "exec", f"{run(ATTACK)} {victim['pid']} {victim['parent']} {halves}")
        for attack in ("victim_mem", "zygote_mem"):
            assert seen[attack].startswith("refused"), (attack, seen[attack])
        # Readable in gVisor, but holding nothing of the victim's: the fork server never had it.
        for attack in ("victim_environ", "zygote_environ"):
            assert seen[attack] in ("False", "refused: Permission denied"), (attack, seen[attack])
        assert seen["secret_seen_in"] == []

        # Hibernated and resumed: the same forked processes, their secret still theirs.
        assert await manager.hibernate(user.user_id) is True
        resumed = await manager.ensure(user.user_id, tenant, f"forks-{platform}")
        again = await shell(resumed, "victim", f"{run(SELF)} {halves}")
        assert (again["pid"], again["parent"], again["has_secret"]) == (victim["pid"], victim["parent"], True)


@pytest.fixture
async def forked(tmp_path_factory):
    directory = Path(tmp_path_factory.mktemp("forks", numbered=True))
    short = Path(f"/tmp/mcpf-fork-{os.getpid()}")  # the socket path must stay within 107 bytes
    short.mkdir(exist_ok=True)
    env = {"MCPFLEET_WORKSPACE_ROOT": str(directory)}
    servers = [ServerConfig(name=n, argv=[sys.executable, "-m", "mcp_servers.exec"], env=env) for n in ("one", "two")]
    supervisor = RunningSupervisor(short, servers, token="t")
    config = SupervisorConfig.read(supervisor.config_path)
    SupervisorConfig(**{**config.__dict__, "fork_modules": ["mcp_servers.exec"]}).write(supervisor.config_path)
    client = SupervisorClient(supervisor.socket, token="t")
    await client.listen()
    supervisor.start()
    await client.wait_ready(120)
    yield supervisor, client, short
    await client.close()
    supervisor.stop()


async def pids(client: SupervisorClient, server: str) -> tuple[int, int]:
    """The server's pid and its parent's."""
    result = await client.request(server, "tools/call", {"name": "run", "arguments": {"command": "echo $PPID"}})
    pid = int(result["structuredContent"]["stdout"])
    with open(f"/proc/{pid}/status") as f:
        parent = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
    return pid, parent


async def test_a_forked_server_that_dies_is_forked_again(forked):
    supervisor, client, directory = forked
    one, zygote = await pids(client, "one")
    assert "sandbox.supervisor.zygote" in Path(f"/proc/{zygote}/cmdline").read_text()
    os.kill(one, signal.SIGKILL)
    await wait_for_state(client, "one", "failed")
    await wait_for_state(client, "one", "ready", timeout=120)
    again, parent = await pids(client, "one")
    assert again != one and parent == zygote
    assert "(forked)" in (directory / "supervisor.log").read_text()


async def test_when_the_fork_server_dies_its_servers_are_forked_from_a_new_one(forked):
    supervisor, client, _ = forked
    one, zygote = await pids(client, "one")
    two, _ = await pids(client, "two")
    os.kill(zygote, signal.SIGKILL)
    for name in ("one", "two"):
        await wait_for_state(client, name, "failed")
    for name in ("one", "two"):
        await wait_for_state(client, name, "ready", timeout=120)
    new_one, new_zygote = await pids(client, "one")
    assert new_zygote != zygote and new_one != one
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in (one, two)):
        assert time.monotonic() < deadline, "a server outlived its fork server"
        time.sleep(0.1)
