"""What a command run by the exec server finds inside a real sandbox: the tools, and the Python."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from core.accounts import add_user
from sandbox.backends.runsc import RunscBackend
from sandbox.factory import SANDBOX_VENV, sandbox_python
from sandbox.manager import SANDBOX_UID, SandboxManager
from sandbox.servers import BUILTIN_SERVERS

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

EXEC = [s for s in BUILTIN_SERVERS if s.name == "exec"]


@pytest.fixture(scope="module")
async def sandbox(db_pool):
    # Short: the gateway's socket lives under it and Unix socket paths stop at 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="mf-", dir="/tmp"))
    backend = RunscBackend(home / "runsc", cgroup_parent="/mcpfleet-test", python=sandbox_python())
    manager = SandboxManager(home, db_pool, backend, EXEC, start_timeout=120)
    await manager.start()
    async with db_pool.connection() as conn:
        user = await add_user(conn, "lena", tenant=f"userland-{os.getpid()}")
    try:
        yield await manager.ensure(user.user_id, f"userland-{os.getpid()}", "lena")
    finally:
        await manager.close()
        shutil.rmtree(home, ignore_errors=True)


async def sh(sandbox, command: str) -> dict:
    result = await sandbox.client.request(
        "exec", "tools/call", {"name": "run", "arguments": {"command": command, "timeout_s": 30}}, timeout=60
    )
    return result["structuredContent"]


def put(workspace: Path, name: str, size: int) -> None:
    path = workspace / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    for p in (path, path.parent):
        os.chown(p, SANDBOX_UID, SANDBOX_UID)


async def test_ls_la_lists_names_sizes_and_owners(sandbox):
    put(sandbox.workspace, "report.txt", 1234)
    put(sandbox.workspace, "data/big.bin", 70001)
    out = await sh(sandbox, "ls -la /workspace; ls -l /workspace/data")
    # Known gap: a server under a uid of its own (not the workspace's owner, a member of its group)
    # gets EACCES from gVisor for /workspace/.. (the mount's root's parent); everything else is listed.
    assert (out["exit_code"], out["stderr"]) == (0, "ls: /workspace/..: Permission denied\n"), out
    lines = out["stdout"].splitlines()
    entries = {line.split()[-1]: line.split() for line in lines if len(line.split()) >= 9}
    assert {".", "report.txt", "data", "big.bin"} <= entries.keys(), out["stdout"]
    assert entries["report.txt"][0] == "-rw-r--r--" and entries["report.txt"][4] == "1234"
    assert entries["report.txt"][2:4] == ["mcp", "mcp"]  # names from the sandbox's own /etc/passwd
    assert entries["data"][0].startswith("d")
    assert entries["big.bin"][4] == "70001"


async def test_stat_reports_size_type_and_owner(sandbox):
    put(sandbox.workspace, "notes/todo.md", 42)
    out = await sh(sandbox, "cd notes && stat todo.md && stat -c '%n|%s|%U|%a|%F' todo.md /workspace/notes")
    assert (out["exit_code"], out["stderr"]) == (0, ""), out
    assert re.search(r"File: .?todo\.md", out["stdout"]), out["stdout"]
    assert re.search(r"Size: 42\s", out["stdout"]), out["stdout"]
    assert out["stdout"].splitlines()[-2:] == [
        "todo.md|42|mcp|644|regular file",
        "/workspace/notes|4096|mcp|2755|directory",  # setgid, from the workspace: new files stay in its group
    ]


async def test_the_rest_of_coreutils_and_debians_alternatives_work(sandbox):
    put(sandbox.workspace, "src/a.txt", 10)
    out = await sh(
        sandbox,
        "cp -a src dst && mv dst/a.txt dst/b.txt && du -a dst && find dst -newer src/a.txt -o -name '*.txt' -print"
        " && tar cf /tmp/t.tar dst && tar tf /tmp/t.tar && rm -r dst && echo 'one two' | awk '{print $2}'",
    )
    assert (out["exit_code"], out["stderr"]) == (0, ""), out
    assert "dst/b.txt" in out["stdout"] and out["stdout"].splitlines()[-1] == "two"
    assert not (sandbox.workspace / "dst").exists()


async def test_the_sandbox_runs_its_own_python(sandbox):
    probe = "import sys, pydantic_core._pydantic_core as c; print(sys.version.split()[0], sys.prefix, c.__file__)"
    out = await sh(sandbox, f"python -c '{probe}'")
    assert out["exit_code"] == 0, out
    version, prefix, extension = out["stdout"].split()
    runtime = sandbox_python()
    assert (version, prefix) == (runtime.version, str(runtime.prefix))
    # The environment's compiled packages are its own, built for that interpreter.
    major, minor = (int(n) for n in version.split(".")[:2])
    assert extension.startswith("/opt/mcpfleet/site-packages/") and f"cpython-{major}{minor}" in extension
    if SANDBOX_VENV.exists() and not os.environ.get("MCPFLEET_SANDBOX_PYTHON"):
        assert (major, minor) >= (3, 12)
