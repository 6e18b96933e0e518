"""Servers that start on first use (`MCPFLEET_START_SERVERS=first-use`): the supervisor, run on the
host with real servers, starts none at boot (nor its fork server), starts one when the first
message that needs it arrives, once however many arrive together, and answers a server that
cannot start with its reason; against real runsc, a fresh sandbox lists and calls its servers
and hibernates and resumes with servers never started."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox.client import SupervisorClient
from sandbox.errors import SandboxRpcError
from sandbox.servers import START_SERVERS_SETTING, ServerSpec, start_servers
from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from tests.clients import connect, text_of
from tests.test_sandbox_lifecycle import SERVERS, call, fleets, row_of  # noqa: F401 (fleets: the fixture)
from tests.test_sandbox_supervisor import BROKEN_SERVER, RunningSupervisor, payload, text, tool, write_fixture

TOKEN = "first-use-token"


def children_of(pid: int) -> set[int]:
    """The processes `pid` started (from any of its threads), read from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass  # the thread ended meanwhile
    return found


async def lazy_supervisor(directory: Path, servers: list[ServerConfig], **config) -> tuple[RunningSupervisor, SupervisorClient]:
    supervisor = RunningSupervisor(directory, servers, token=TOKEN)
    written = SupervisorConfig.read(supervisor.config_path)
    SupervisorConfig(**{**written.__dict__, "start_servers": "first-use", **config}).write(supervisor.config_path)
    client = SupervisorClient(supervisor.socket, token=TOKEN)
    await client.listen()
    supervisor.start()
    await client.wait_ready(60)
    return supervisor, client


@pytest.fixture
async def short_dir() -> AsyncIterator[Path]:
    # A short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mcpf-lazy-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def lazy(short_dir: Path) -> AsyncIterator[tuple[RunningSupervisor, SupervisorClient]]:
    fixture = write_fixture(short_dir)
    supervisor, client = await lazy_supervisor(
        short_dir,
        [
            ServerConfig(name="fixture", argv=[sys.executable, str(fixture)]),
            ServerConfig(name="other", argv=[sys.executable, str(fixture)]),
            ServerConfig(name="broken", argv=[sys.executable, "-c", BROKEN_SERVER]),
        ],
    )
    yield supervisor, client
    await client.close()
    supervisor.stop()


def test_the_setting_defaults_to_first_use_and_refuses_other_values(monkeypatch):
    monkeypatch.delenv(START_SERVERS_SETTING, raising=False)
    assert start_servers() == "first-use"
    monkeypatch.setenv(START_SERVERS_SETTING, "Boot")
    assert start_servers() == "boot"
    monkeypatch.setenv(START_SERVERS_SETTING, "lazy")
    with pytest.raises(ValueError, match="boot or first-use"):
        start_servers()


async def test_no_server_runs_until_its_first_call(lazy):
    supervisor, client = lazy
    assert {name: s["state"] for name, s in client.servers.items()} == {"fixture": "idle", "other": "idle", "broken": "idle"}
    assert children_of(supervisor.process.pid) == set()
    # A notification to every server starts none of them.
    await client.notify(None, "notifications/roots/list_changed")
    await asyncio.sleep(0.5)
    assert children_of(supervisor.process.pid) == set()

    assert text(await tool(client, "echo", text="hi")) == "hi"
    assert client.servers["fixture"]["state"] == "ready"
    assert client.servers["fixture"]["initialize"]["serverInfo"]["name"] == "fixture"
    assert client.servers["other"]["state"] == "idle"  # the others stay down
    assert children_of(supervisor.process.pid) == {payload(await tool(client, "whoami"))["pid"]}


async def test_concurrent_first_calls_start_the_server_once(lazy):
    supervisor, client = lazy
    counts = await asyncio.gather(*(tool(client, "counter") for _ in range(12)))
    # One process counted them all: a second start would have counted from 1 again.
    assert sorted(int(text(c)) for c in counts) == list(range(1, 13))
    assert len(children_of(supervisor.process.pid)) == 1
    log = Path(supervisor.log.name).read_text()
    assert log.count("server fixture starts on first use") == 1


async def test_a_server_that_cannot_start_fails_its_first_calls_with_the_reason(lazy):
    _, client = lazy
    started = time.monotonic()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(client.request("broken", "tools/list") for _ in range(3)), return_exceptions=True), 60
    )
    for outcome in outcomes:
        assert isinstance(outcome, SandboxRpcError), outcome
        assert "not running" in outcome.message and "code 7" in outcome.message and "no such luck" in outcome.message
    assert time.monotonic() - started < 60
    assert client.servers["broken"]["state"] == "failed"
    # The catalog says so too, with empty lists, and the others are listed all the same.
    catalog = await asyncio.wait_for(client.catalog(), 60)
    assert catalog["broken"]["state"] == "failed" and "code 7" in catalog["broken"]["error"]
    assert catalog["broken"]["tools"] == []
    assert "echo" in {t["name"] for t in catalog["fixture"]["tools"]}


async def test_the_catalog_starts_idle_servers_and_lists_them(lazy):
    _, client = lazy
    catalog, again = await asyncio.gather(client.catalog(), client.catalog())
    for name in ("fixture", "other"):
        assert catalog[name]["state"] == "ready", catalog[name]
        assert {"echo", "counter"} <= {t["name"] for t in catalog[name]["tools"]}
        assert catalog[name]["serverInfo"]["name"] == "fixture"
        assert again[name]["tools"] == catalog[name]["tools"]
    assert (await client.catalog())["fixture"] is (await client.catalog())["fixture"]  # cached once up


async def test_the_fork_server_starts_with_the_first_fork(short_dir: Path):
    env = {"MCPFLEET_WORKSPACE_ROOT": str(short_dir)}
    servers = [ServerConfig(name=n, argv=[sys.executable, "-m", "mcp_servers.exec"], env=env) for n in ("one", "two")]
    supervisor, client = await lazy_supervisor(short_dir, servers, fork_modules=["mcp_servers.exec"])
    try:
        await asyncio.sleep(1)
        assert children_of(supervisor.process.pid) == set()  # no fork server yet
        await client.request("one", "tools/list", timeout=120)
        [fork_server] = children_of(supervisor.process.pid)
        assert "forked" in Path(supervisor.log.name).read_text()
        assert client.servers["two"]["state"] == "idle"
        await client.request("two", "tools/list", timeout=120)
        assert children_of(supervisor.process.pid) == {fork_server}  # both forked from it
        assert len(children_of(fork_server)) == 2
    finally:
        await client.close()
        supervisor.stop()


# -- against real runsc ---------------------------------------------------------------------------

runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


@runsc
async def test_hibernate_and_resume_with_servers_never_started(fleets, monkeypatch):  # noqa: F811
    monkeypatch.setenv(START_SERVERS_SETTING, "first-use")
    fleet = await fleets("first-use")
    manager = await fleet.manager()
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    assert {s["state"] for s in sandbox.client.servers.values()} == {"idle"}
    assert await manager.hibernate(alice[0]) is True
    assert (await row_of(fleet.pool, sandbox.id))["state"] == "Hibernated"

    resumed = await manager.ensure(*alice)
    assert resumed.id == sandbox.id
    assert {s["state"] for s in resumed.client.servers.values()} == {"idle"}
    assert int(text(await call(resumed, "counter"))) == 1  # started now, inside the restored sandbox
    # Hibernated again with one server up and one never started: the one up keeps its memory.
    assert await manager.hibernate(alice[0]) is True
    resumed = await manager.ensure(*alice)
    assert resumed.client.servers["exec"]["state"] == "idle"
    assert int(text(await call(resumed, "counter"))) == 2
    result = await call(resumed, "run", server="exec", command="echo up")
    assert result["structuredContent"]["stdout"].strip() == "up"


@runsc
async def test_tools_list_through_the_gateway_on_a_fresh_sandbox(fleet):
    # The shared fleet runs with the default, first-use: the new user's sandbox starts with no server up.
    key = fleet.add_user("first-use-lister")
    async with connect(fleet.mcp_url, key, "legacy") as client:
        names = [t.name for t in (await client.list_tools()).tools]
        assert {"workspace__list_dir", "exec__run"} <= set(names)
        listed = await client.call_tool("workspace__write_file", {"path": "lazy.txt", "content": "up"})
        assert not listed.is_error, text_of(listed)


@runsc
async def test_in_a_sandbox_a_server_that_cannot_start_fails_its_first_call_with_the_reason(fleets, monkeypatch):  # noqa: F811
    monkeypatch.setenv(START_SERVERS_SETTING, "first-use")
    fleet = await fleets("first-use-broken")
    manager = await fleet.manager(servers=[*SERVERS, ServerSpec("broken", ("python", "-c", BROKEN_SERVER))])
    bob = await fleet.user("bob")
    sandbox = await manager.ensure(*bob)  # not held up by it: nothing has started yet
    assert sandbox.client.servers["broken"]["state"] == "idle"
    with pytest.raises(SandboxRpcError) as caught:
        await asyncio.wait_for(call(sandbox, "anything", server="broken"), 120)
    assert "not running" in caught.value.message and "code 7" in caught.value.message
    assert "no such luck" in caught.value.message
    assert int(text(await call(sandbox, "counter"))) == 1  # the others are unaffected
