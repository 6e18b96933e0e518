"""Servers in one sandbox are strangers: each runs under a uid of its own (sandbox/supervisor/uids.py).

Attacks from the exec server's code (the most a server's neighbour can do: any command) on a
neighbour holding a secret, in a real gVisor sandbox, with both runsc builds this machine has
(2022-12 on ptrace, 2024-07 on systrap: `sandbox.gvisor`): its environment, its memory, its private
dir, signals. And what they share still works: the workspace, by group.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest

from core.accounts import add_user
from sandbox.backends.runsc import RunscBackend
from sandbox.bundle import SERVER_UIDS
from sandbox.gvisor import PINNED_RUNSC
from sandbox.servers import ServerSpec
from tests.test_sandbox_backends import call, managed
from tests.test_sandbox_supervisor import text

SECRET = "victim-secret-9f3a7c1e"

VICTIM = r'''
import ctypes, os
from mcp.server.mcpserver import MCPServer

private = os.environ["TMPDIR"]
with open(os.path.join(private, "keep"), "w") as f:
    f.write(os.environ["VICTIM_TOKEN"])
with open("/workspace/from-victim.txt", "w") as f:
    f.write("shared\n")
held = ctypes.create_string_buffer(os.environ["VICTIM_TOKEN"].encode())  # the secret in its memory too

server = MCPServer("victim")


@server.tool()
def who() -> str:
    own = os.environ.get("VICTIM_TOKEN", "").startswith("victim-secret")
    return f"{os.getpid()} {os.getuid()} {os.getgid()} {private} {ctypes.addressof(held)} {own}"


@server.tool()
def read_workspace(name: str) -> str:
    with open(os.path.join("/workspace", name)) as f:
        return f.read()


server.run()
'''

ATTACK = r'''
import json, os, signal, sys
pid, private, address = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
secret = sys.argv[4] + sys.argv[5]  # in halves: the whole is in no command line
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}

def attempt(name, action):
    try:
        out[name] = repr(action())
    except OSError as exc:
        out[name] = f"refused: {exc.strerror}"

def read(path):
    with open(path, "rb") as f:
        return f.read()

def memory():
    with open(f"/proc/{pid}/mem", "rb") as f:
        f.seek(address)
        return f.read(64)

attempt("environ", lambda: read(f"/proc/{pid}/environ"))
attempt("mem", memory)
attempt("private_list", lambda: os.listdir(private))
attempt("private_file", lambda: read(os.path.join(private, "keep")))
attempt("signal", lambda: os.kill(pid, 0))
attempt("signal_group", lambda: os.killpg(pid, signal.SIGSTOP))
attempt("supervisor_environ", lambda: read("/proc/1/environ"))
seen = []
for other in filter(str.isdigit, os.listdir("/proc")):
    for name in ("environ", "cmdline"):
        try:
            if secret.encode() in read(f"/proc/{other}/{name}"):
                seen.append(f"{other}/{name}")
        except OSError:
            pass
out["secret_seen_in"] = seen
with open("/workspace/from-victim.txt", "a") as f:
    f.write("and exec's\n")
with open("/workspace/from-exec.txt", "w") as f:
    f.write("exec wrote this\n")
print(json.dumps(out))
'''

RUNSC_BUILDS = [
    pytest.param("/usr/bin/runsc", "ptrace", id="runsc-2022-ptrace",
                 marks=pytest.mark.skipif(not shutil.which("/usr/bin/runsc"), reason="no system runsc")),
    pytest.param(str(PINNED_RUNSC), "systrap", id="runsc-2024-systrap",
                 marks=pytest.mark.skipif(not PINNED_RUNSC.exists(), reason="the pinned gVisor is not unpacked")),
]

SERVERS = [
    ServerSpec("exec", ("python", "-m", "mcp_servers.exec")),
    ServerSpec("victim", ("python", "-c", VICTIM), env={"VICTIM_TOKEN": SECRET}),
]


@pytest.mark.parametrize(("runsc", "platform"), RUNSC_BUILDS)
async def test_a_neighbour_cannot_read_another_servers_environment_memory_or_files_nor_signal_it(
    runsc, platform, home, db_pool
):
    backend = RunscBackend(home / f"runsc-uids-{platform}", runsc=runsc, platform=platform, cgroup_parent="/mcpfleet-test")
    async with managed(home, db_pool, backend, SERVERS) as manager:
        async with db_pool.connection() as conn:
            user = await add_user(conn, f"uids-{platform}", tenant=f"uids-{os.getpid()}")
        sandbox = await manager.ensure(user.user_id, f"uids-{os.getpid()}", f"uids-{platform}")

        pid, uid, gid, private, address, own = text(await call(sandbox, "who", server="victim")).split()
        assert own == "True"  # the victim has its secret: what the neighbour is refused below
        assert int(uid) >= SERVER_UIDS

        command = f"python -c {shlex.quote(ATTACK)} {pid} {private} {address} {SECRET[:8]} {SECRET[8:]}"
        result = await call(sandbox, "run", server="exec", command=command)
        assert result["structuredContent"]["exit_code"] == 0, result["structuredContent"]
        seen = json.loads(result["structuredContent"]["stdout"])

        assert seen["uid"] >= SERVER_UIDS and seen["uid"] != int(uid)
        assert seen["gid"] == int(gid) and seen["groups"] in ([], [int(gid)])
        for attack in ("mem", "private_list", "private_file", "signal", "signal_group"):
            assert seen[attack].startswith("refused"), (attack, seen[attack])
        # gVisor shows any process's /proc/PID/environ to all (Linux asks for ptrace access): the
        # environment a server was executed with holds nothing of its own (sandbox/supervisor/launch.py).
        for attack in ("environ", "supervisor_environ"):
            assert "VICTIM_TOKEN" not in seen[attack] and "TMPDIR=/tmp/.servers/exec" not in seen[attack]
        assert seen["secret_seen_in"] == []
        assert SECRET not in json.dumps(result)

        # What they share, they share: each writes the workspace, and reads what the other wrote.
        assert text(await call(sandbox, "read_workspace", server="victim", name="from-victim.txt")) == "shared\nand exec's\n"
        assert text(await call(sandbox, "read_workspace", server="victim", name="from-exec.txt")) == "exec wrote this\n"
        # The victim is still there, unharmed by the stop signal it was sent.
        assert text(await call(sandbox, "who", server="victim")).split()[0] == pid
