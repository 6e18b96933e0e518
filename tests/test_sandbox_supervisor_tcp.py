"""The supervisor listening on TCP, as in a Kubernetes pod: a real supervisor process on loopback,
the fixture MCP server of tests/test_sandbox_supervisor.py, and gateway clients that connect and
attach with the token (`sandbox.wire`, attach)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sandbox import wire
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.supervisor.config import ServerConfig
from tests.test_sandbox_supervisor import RunningSupervisor, payload, text, tool, write_fixture

TOKEN = "tcp-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListeningSupervisor(RunningSupervisor):
    """`python -m sandbox.supervisor --listen 127.0.0.1:PORT CONFIG`: the pod's command line."""

    def __init__(self, directory: Path, servers: list[ServerConfig], token: str, token_file: bool | Path = False):
        """`token_file`: True to write `token` into a file of its own, a path to use that file as it is."""
        super().__init__(directory, servers, token="" if token_file else token)
        self.port = free_port()
        self.token_file = token_file if isinstance(token_file, Path) else directory / "token" if token_file else None
        if token_file is True:
            self.token_file.write_text(token + "\n")

    def start(self) -> None:
        argv = [sys.executable, "-m", "sandbox.supervisor", "--listen", f"127.0.0.1:{self.port}"]
        if self.token_file is not None:
            argv += ["--token-file", str(self.token_file)]
        self.process = subprocess.Popen([*argv, str(self.config_path)], stdout=self.log, stderr=self.log)


def start_listening(directory: Path, token: str = TOKEN, *, token_file: bool | Path = False) -> ListeningSupervisor:
    fixture = write_fixture(directory)
    supervisor = ListeningSupervisor(
        directory, [ServerConfig(name="fixture", argv=[sys.executable, str(fixture)])], token, token_file
    )
    supervisor.start()
    return supervisor


@pytest.fixture(scope="module")
def listening():
    with tempfile.TemporaryDirectory(prefix="mcpf-tcp-", dir="/tmp") as d:
        supervisor = start_listening(Path(d))
        yield supervisor
        supervisor.stop()


async def connected(supervisor: ListeningSupervisor, token: str = TOKEN) -> SupervisorClient:
    client = SupervisorClient(token=token)
    await client.connect("127.0.0.1", supervisor.port, timeout=60)
    return client


async def raw_exchange(port: int, first: bytes, wait: float = 3.0) -> bytes:
    """What the supervisor sends back to a connection that opens with `first`, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    try:
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


async def test_a_call_over_tcp(listening):
    client = await connected(listening)
    try:
        assert client.servers["fixture"]["state"] == "ready"
        assert client.address == f"127.0.0.1:{listening.port}"
        assert text(await tool(client, "echo", text="over tcp")) == "over tcp"
        assert "echo" in {t["name"] for t in (await client.catalog())["fixture"]["tools"]}
    finally:
        await client.close()


async def test_a_wrong_token_is_refused_without_hello(listening):
    await connected(listening)  # up and listening
    wrong = wire.encode({"type": "attach", "token": TOKEN + "x"})
    assert await raw_exchange(listening.port, wrong) == b""
    # Anything other than an attach first is refused alike, even the right hello-shaped words.
    assert await raw_exchange(listening.port, wire.encode({"type": "ping", "id": 1})) == b""
    with pytest.raises(SandboxUnavailable, match="did not say hello"):
        await connected(listening, token="not-the-token")


async def test_the_right_token_is_answered_with_the_hello(listening):
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.port)
    try:
        writer.write(wire.encode({"type": "attach", "token": TOKEN}))
        hello = json.loads(await asyncio.wait_for(reader.readline(), 30))
        assert hello["type"] == "hello" and hello["token"] == TOKEN
        assert hello["servers"]["fixture"]["state"] == "ready"
    finally:
        writer.close()


async def test_a_second_gateway_attaches_beside_the_first(listening):
    """Two replicas serving one user at the same moment: neither interrupts the other's call
    (tests/test_sandbox_supervisor_gateways.py goes into what reaches whom)."""
    first = await connected(listening)
    slow = asyncio.ensure_future(tool(first, "slow", seconds=3))
    await asyncio.sleep(0.3)
    second = await connected(listening)
    try:
        assert text(await tool(second, "echo", text="second")) == "second"
        assert text(await asyncio.wait_for(slow, 60)) == "done"
        assert first.connected and second.connected
        assert text(await tool(first, "echo", text="first still")) == "first still"
    finally:
        await first.close()
        await second.close()


async def test_notifications_and_cancel_over_tcp(listening):
    client = await connected(listening)
    try:
        seen = []
        result = await client.request(
            "fixture",
            "tools/call",
            {"name": "slow", "arguments": {"seconds": 0.15}, "_meta": {"progressToken": "p"}},
            on_notification=lambda m, p: seen.append(p["progress"]),
        )
        assert text(result) == "done" and seen == [1, 2, 3]
        with pytest.raises(TimeoutError):
            await client.request("fixture", "tools/call", {"name": "slow", "arguments": {"seconds": 5}}, timeout=0.2)
        assert payload(await tool(client, "whoami"))["pid"] > 0
        await client.ping()
    finally:
        await client.close()


async def test_the_token_may_come_from_a_file():
    with tempfile.TemporaryDirectory(prefix="mcpf-tcp-", dir="/tmp") as d:
        supervisor = start_listening(Path(d), "from-a-file", token_file=True)
        try:
            client = await connected(supervisor, token="from-a-file")
            assert text(await tool(client, "echo", text="ok")) == "ok"
            await client.close()
        finally:
            supervisor.stop()


def kubelet_secret_volume(directory: Path, token: str, generation: int) -> Path:
    """Write `token` as the kubelet writes a Secret volume (its AtomicWriter): the files in a new
    timestamped dir, `..data` swapped to it by a rename, `token` a symlink through `..data`."""
    fresh = directory / f"..2026_11_29_{generation}"
    fresh.mkdir()
    (fresh / "token").write_text(token)
    (directory / "..data_tmp").symlink_to(fresh.name)
    (directory / "..data_tmp").rename(directory / "..data")
    if not (directory / "token").is_symlink():
        (directory / "token").symlink_to("..data/token")
    return directory / "token"


async def test_a_claimed_pool_pods_new_token_is_read_at_attach_and_the_old_one_refused():
    """A warm pod starts with the pool's token; the claim replaces its Secret, which the kubelet
    swaps in place. The same supervisor process (no restart) then takes only the new token."""
    with tempfile.TemporaryDirectory(prefix="mcpf-tcp-", dir="/tmp") as d:
        volume = Path(d) / "secret"
        volume.mkdir()
        token_file = kubelet_secret_volume(volume, "warm-pool-token", 1)
        supervisor = start_listening(Path(d), token_file=token_file)
        try:
            warm = await connected(supervisor, token="warm-pool-token")
            pid = payload(await tool(warm, "whoami"))["pid"]
            await warm.close()

            kubelet_secret_volume(volume, "the-users-token", 2)  # the claim
            assert await raw_exchange(supervisor.port, wire.encode({"type": "attach", "token": "warm-pool-token"})) == b""
            with pytest.raises(SandboxUnavailable, match="did not say hello"):
                await connected(supervisor, token="warm-pool-token")
            claimed = await connected(supervisor, token="the-users-token")
            try:
                assert payload(await tool(claimed, "whoami"))["pid"] == pid  # the same server, never restarted
                assert supervisor.process.poll() is None
            finally:
                await claimed.close()
            # An unreadable token file attaches nobody (rather than whatever token was read last).
            (volume / "..data").unlink()
            assert await raw_exchange(supervisor.port, wire.encode({"type": "attach", "token": "the-users-token"})) == b""
        finally:
            supervisor.stop()


async def test_connect_gives_up_when_nothing_listens():
    client = SupervisorClient(token=TOKEN)
    started = time.monotonic()
    with pytest.raises(SandboxUnavailable, match="cannot connect"):
        await client.connect("127.0.0.1", free_port(), timeout=0.5)
    assert time.monotonic() - started < 3
