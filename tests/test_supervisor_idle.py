"""An idle sandbox's own code sleeps: with the gateway attached and nothing asked, the supervisor and
its servers make no periodic wakeups. Each wakeup inside gVisor is a round trip through the sentry,
so a timer here would add to the floor that systrap already costs (bench/idle_cpu.py measures both).

Run on the host (the supervisor is plain Python): the count is of context switches in /proc, which
gVisor's own /proc does not give. An idle process blocked in epoll or a read makes none; any timer,
poll or keepalive makes at least one per period. The window only gives a periodic timer its chance
to fire; nothing here depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox.client import SupervisorClient
from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from tests.test_sandbox_supervisor import TOKEN, RunningSupervisor, text, tool, write_fixture

WINDOW_S = 3.0
"""Long enough for any timer of a second or less to fire twice or more."""
ALLOWED_WAKEUPS = 1
"""A stray one (the kernel's own bookkeeping of a thread), never a period's worth."""


def wakeups(pid: int) -> dict[int, int]:
    """Context switches, voluntary and not, of each thread of `pid` and of its descendants."""
    counts: dict[int, int] = {}
    queue = [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
                queue += [int(kid) for kid in (task / "children").read_text().split()]
            except OSError:
                continue
            counts[int(task.name)] = sum(
                int(line.split()[1]) for line in status.splitlines() if line.endswith(tuple("0123456789")) and "ctxt_switches" in line
            )
    return counts


async def call(client: SupervisorClient, forked: bool, said: str) -> str:
    """One tool call that answers `said`: the fixture server's echo, or the exec server's shell."""
    if not forked:
        return text(await tool(client, "echo", text=said))
    result = await client.request("server", "tools/call", {"name": "run", "arguments": {"command": f"echo {said}"}})
    return result["structuredContent"]["stdout"].strip()


@pytest.fixture(params=["executed", "forked"])
async def idle_supervisor(request):
    """A supervisor with one server: an SDK server executed as a Python of its own, or the built-in
    exec server forked from the fork server (the fleet's default), whose zygote then stays too."""
    forked = request.param == "forked"
    with tempfile.TemporaryDirectory(prefix="mcpf-idle-", dir="/tmp") as d:  # short: a Unix socket path
        workdir = Path(d)
        if forked:
            server = ServerConfig(name="server", argv=[sys.executable, "-m", "mcp_servers.exec"], env={"MCPFLEET_WORKSPACE_ROOT": d})
        else:
            server = ServerConfig(name="fixture", argv=[sys.executable, str(write_fixture(workdir))])
        supervisor = RunningSupervisor(workdir, [server], token=TOKEN)
        if forked:
            config = SupervisorConfig.read(supervisor.config_path)
            SupervisorConfig(**{**config.__dict__, "fork_modules": ["mcp_servers.exec"]}).write(supervisor.config_path)
        client = SupervisorClient(supervisor.socket, token=TOKEN)
        await client.listen()
        supervisor.start()
        try:
            await client.wait_ready(120)
            yield supervisor, client, forked
        finally:
            await client.close()
            supervisor.stop()


async def test_an_idle_supervisor_and_its_server_make_no_periodic_wakeups(idle_supervisor):
    supervisor, client, forked = idle_supervisor
    assert await call(client, forked, "warm") == "warm"  # the server started and answered, as after a user's call
    await client.ping()
    await asyncio.sleep(1.0)  # the call's own tail (its reply written, the server's task finished)
    assert supervisor.process is not None
    before = wakeups(supervisor.process.pid)
    assert len(before) >= 2, f"the supervisor and its server's threads were not found: {before}"
    await asyncio.sleep(WINDOW_S)
    after = wakeups(supervisor.process.pid)
    woke = {tid: after[tid] - before[tid] for tid in before if tid in after and after[tid] != before[tid]}
    assert sum(woke.values()) <= ALLOWED_WAKEUPS, f"threads that woke while idle (thread id: times): {woke}"
    # Still alive and attached: the quiet was not a dead channel.
    assert await call(client, forked, "after") == "after"
