"""The tunnel's bounds, either end, over real sockets: the window holds a sender back until the
receiver acknowledges, and an end that sends past it, or garbage, loses its tunnel; the gateway
holds at most MAX_TUNNELS per sandbox, and its policy's refusals reach the proxy as such.

The sandbox side here is this test, speaking the wire messages the way a supervisor taken over
by hostile code could; the tunnels' far ends are real TCP servers on this host's loopback.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from typing import Any

from gateway.call_audit import CallAudit
from gateway.egress import SandboxEgress, declared_ports
from sandbox import wire
from sandbox.channel import Connection
from sandbox.client import SupervisorClient
from sandbox.running import Sandbox
from sandbox.servers import ServerSpec
from sandbox.tunnels import EgressRefused, Opened, TunnelRelay


async def tunnel_over_socketpair() -> tuple[wire.Tunnel, socket.socket, list[dict[str, Any]]]:
    near, far = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=near)
    sent: list[dict[str, Any]] = []
    return wire.Tunnel(7, reader, writer, sent.append), far, sent


def data(payload: bytes) -> dict[str, Any]:
    return {"type": "tunnel_data", "tunnel": 7, "data": base64.b64encode(payload).decode()}


def sent_bytes(sent: list[dict[str, Any]]) -> int:
    return sum(len(base64.b64decode(m["data"])) for m in sent if m["type"] == "tunnel_data")


async def test_a_sender_waits_for_acknowledgements_once_the_window_is_full():
    tunnel, far, sent = await tunnel_over_socketpair()
    far.setblocking(False)
    payload = b"y" * (wire.TUNNEL_WINDOW * 3)
    pump = asyncio.create_task(tunnel.pump())
    view = memoryview(payload)
    while view:  # the socket's buffer takes what it takes; the pump drains it into the window
        try:
            view = view[far.send(view):]
        except BlockingIOError:
            await asyncio.sleep(0.01)
        if sent_bytes(sent) >= wire.TUNNEL_WINDOW:
            break
    await asyncio.sleep(0.1)
    assert sent_bytes(sent) == wire.TUNNEL_WINDOW  # and not a byte more without an ack
    tunnel.receive({"type": "tunnel_ack", "tunnel": 7, "bytes": 4096})
    await asyncio.sleep(0.1)
    assert sent_bytes(sent) == wire.TUNNEL_WINDOW + 4096
    tunnel.receive({"type": "tunnel_close", "tunnel": 7, "error": None})
    await pump
    far.close()


async def test_an_end_that_overruns_the_window_or_sends_garbage_loses_its_tunnel():
    tunnel, far, sent = await tunnel_over_socketpair()
    chunk = b"z" * wire.TUNNEL_CHUNK
    for _ in range(wire.TUNNEL_WINDOW // wire.TUNNEL_CHUNK):
        tunnel.receive(data(chunk))  # no ack can go out in between: nothing awaited
    assert not tunnel.closed
    tunnel.receive(data(b"one byte too many"))
    assert tunnel.closed and tunnel.error == "the other end sent more than the window allows"
    assert sent[-1] == {"type": "tunnel_close", "tunnel": 7, "error": tunnel.error}
    far.close()

    tunnel, far, sent = await tunnel_over_socketpair()
    tunnel.receive({"type": "tunnel_data", "tunnel": 7, "data": "not base64!"})
    assert tunnel.closed and "not base64" in (tunnel.error or "")
    tunnel, far, sent = await tunnel_over_socketpair()
    tunnel.receive(data(b"x" * (wire.TUNNEL_CHUNK + 1)))
    assert tunnel.closed


class LoopbackPolicy:
    """Connects every tunnel to one real server on this host's loopback (its port given)."""

    def __init__(self, port: int):
        self.port = port
        self.finished_with: list[str] = []

    async def open(self, sandbox: Sandbox, server: str, host: str, port: int) -> Opened:
        if host != "allowed.example":
            raise EgressRefused(f"{host} is not allowed")
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return Opened(reader, writer, "127.0.0.1")

    def finished(self, sandbox: Sandbox, server: str, host: str, port: int, **facts: Any) -> None:
        self.finished_with.append(facts["outcome"])


async def read_messages(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    reader, _ = await asyncio.open_connection(sock=sock)
    return [wire.decode(await asyncio.wait_for(reader.readline(), 5)) for _ in range(count)]


async def test_the_gateway_holds_at_most_max_tunnels_per_sandbox_and_says_why_it_refuses(tmp_path):
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    far_server = await asyncio.start_server(accept, "127.0.0.1", 0)
    policy = LoopbackPolicy(far_server.sockets[0].getsockname()[1])
    relay = TunnelRelay(policy)
    relay.sandbox = object()  # type: ignore[assignment]  # the policy here does not look at it
    gateway_end, supervisor_end = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=gateway_end)
    connection = Connection(writer)
    relay.on_message(connection, {"type": "tunnel_open", "tunnel": 99, "server": "s", "host": "evil.example", "port": 443})
    for tunnel_id in range(1, wire.MAX_TUNNELS + 3):
        relay.on_message(connection, {"type": "tunnel_open", "tunnel": tunnel_id, "server": "s", "host": "allowed.example", "port": 443})
        await asyncio.sleep(0.01)
    answers = await read_messages(supervisor_end, wire.MAX_TUNNELS + 3)
    statuses = [a["status"] for a in answers]
    assert statuses.count(200) == wire.MAX_TUNNELS and statuses.count(503) == 2
    assert {"type": "tunnel_opened", "tunnel": 99, "error": "evil.example is not allowed", "status": 403} in answers
    assert len(held) == wire.MAX_TUNNELS
    relay.drop_all("test over")
    await asyncio.sleep(0.05)
    assert policy.finished_with.count("refused") == 1 and policy.finished_with.count("error") == wire.MAX_TUNNELS
    far_server.close()


def test_a_declared_host_allows_its_port_or_the_web_ports():
    declared = ("api.example.com", "tiles.example.com:8443", "API.Other.example.")
    assert declared_ports(declared, "api.example.com") == {443, 80}
    assert declared_ports(declared, "tiles.example.com") == {8443}
    assert declared_ports(declared, "api.other.example") == {443, 80}
    assert declared_ports(declared, "example.com") == set()
    assert declared_ports(declared, "evil.api.example.com") == set()


async def test_the_policy_refuses_a_sandbox_nobody_holds_and_a_server_without_egress():
    egress = SandboxEgress(CallAudit())
    spec = ServerSpec("plain", ("python", "-m", "x"))
    for user_id in (None, 1):
        sandbox = Sandbox(id="sbx-test", user_id=user_id, tenant="t", user="u", tier=None, client=SupervisorClient(),  # type: ignore[arg-type]
                          layout=None, created_at=None, servers=(spec,))  # type: ignore[arg-type]
        try:
            await egress.open(sandbox, "plain", "api.example.com", 443)
        except EgressRefused as exc:
            assert str(exc) == ("a sandbox nobody holds yet has no egress" if user_id is None
                                else "server 'plain' declares no egress hosts")
        else:
            raise AssertionError("egress was granted")


def test_a_published_servers_declared_hosts_reach_its_supervisor_config():
    from registry.artifacts import server_spec
    from sandbox.servers import server_configs

    spec = server_spec("weather", "a" * 64, "weather.server:main", (), egress=("api.weather.example", "tiles.weather.example:8443"))
    assert spec.egress == ("api.weather.example", "tiles.weather.example:8443")
    config = server_configs([spec])[0]
    assert config.egress == ["api.weather.example", "tiles.weather.example:8443"]
    assert server_configs([ServerSpec("plain", ("python", "-m", "x"))])[0].egress == []


async def test_an_idle_tunnel_is_closed_and_both_ends_hear_of_it():
    far_ends: list[asyncio.StreamReader] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far_ends.append(reader)

    far_server = await asyncio.start_server(accept, "127.0.0.1", 0)
    policy = LoopbackPolicy(far_server.sockets[0].getsockname()[1])
    relay = TunnelRelay(policy, idle_s=0.3)
    relay.sandbox = object()  # type: ignore[assignment]
    gateway_end, supervisor_end = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=gateway_end)
    relay.on_message(Connection(writer), {"type": "tunnel_open", "tunnel": 1, "server": "s", "host": "allowed.example", "port": 443})
    opened, closed = await read_messages(supervisor_end, 2)
    assert opened["status"] == 200
    assert closed == {"type": "tunnel_close", "tunnel": 1, "error": "nothing went through for 0.3s"}
    await asyncio.sleep(0.05)
    assert policy.finished_with == ["error"]
    assert await asyncio.wait_for(far_ends[0].read(), 1) == b""  # the far host saw the connection closed
    far_server.close()
