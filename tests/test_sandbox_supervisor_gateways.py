"""Several gateway replicas attached to one pod's supervisor at once (`link.Listener`): a real
supervisor process listening on loopback, real MCP servers under it, and gateway connections
spoken to line by line (`sandbox.wire`), so that each test chooses the ids, the timing and who
hangs up. What one gateway asked must reach that gateway only, ids chosen by two gateways may
be equal, and a gateway that goes away ends only what it had open."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sandbox import wire
from sandbox.client import SupervisorClient
from sandbox.supervisor.config import ServerConfig
from sandbox.supervisor.link import MAX_GATEWAYS, MAX_UNATTACHED
from tests.test_sandbox_supervisor import text, write_fixture
from tests.test_sandbox_supervisor_tcp import TOKEN, ListeningSupervisor, raw_exchange

# A server in raw JSON-RPC whose calls finish when told, which remembers what it was told to
# cancel, which asks its client (roots/list) on behalf of a call, asks the model endpoint,
# fetches a URL through the egress proxy, and exports spans to the trace endpoint.
RECORDING_SERVER = r'''
import json, os, sys, threading, time, urllib.error, urllib.request

lock = threading.Lock()
cancelled, asked = [], {}


def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def answer(request_id, value):
    send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": value}]}})


def later(request_id, seconds, value):
    time.sleep(seconds)
    if request_id not in cancelled:
        answer(request_id, value)


def ask_model(request_id):
    request = urllib.request.Request(os.environ["OLLAMA_HOST"] + "/api/generate", data=b'{"prompt": "hi"}',
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as response:
            answer(request_id, "%d %s" % (response.status, response.read().decode()))
    except urllib.error.HTTPError as exc:
        answer(request_id, "%d %s" % (exc.code, exc.read().decode()))


def fetch(request_id, url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["HTTP_PROXY"]}))
    try:
        with opener.open(url, timeout=120) as response:
            answer(request_id, "%d %s" % (response.status, response.read().decode()))
    except urllib.error.HTTPError as exc:
        answer(request_id, "%d %s" % (exc.code, exc.read().decode()))


def export_spans(request_id):
    request = urllib.request.Request(os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], data=b"spans",
                                     headers={"Content-Type": "application/x-protobuf"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=120) as response:
            answer(request_id, "%d" % response.status)
    except urllib.error.HTTPError as exc:
        answer(request_id, "%d" % exc.code)


for line in sys.stdin:
    message = json.loads(line)
    method = message.get("method")
    if method is None:  # the client's answer to our ask
        answer(asked.pop(message["id"]), json.dumps(message.get("result") or message.get("error")))
    elif method == "initialize":
        send({"jsonrpc": "2.0", "id": message["id"], "result": {
            "protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "rec", "version": "0"}}})
    elif method == "notifications/cancelled":
        cancelled.append(message["params"]["requestId"])
    elif method == "tools/call":
        name, arguments = message["params"]["name"], message["params"].get("arguments") or {}
        if name == "wait":
            threading.Thread(target=later, args=(message["id"], arguments["seconds"], arguments["text"])).start()
        elif name == "fetch":
            threading.Thread(target=fetch, args=(message["id"], arguments["url"])).start()
        elif name == "spans":
            threading.Thread(target=export_spans, args=(message["id"],)).start()
        elif name == "model":
            threading.Thread(target=ask_model, args=(message["id"],)).start()
        elif name == "cancelled":
            answer(message["id"], json.dumps(cancelled))
        elif name == "ask":
            key = "ask-%s" % message["id"]
            asked[key] = message["id"]
            send({"jsonrpc": "2.0", "id": key, "method": "roots/list",
                  "params": {"_meta": {"io.mcpfleet/relatedRequestId": message["id"]}}})
'''


class RawGateway:
    """One gateway connection: attached with the token, then messages sent and awaited by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.hello: dict[str, Any] = {}
        self.got: list[dict[str, Any]] = []  # everything read, in order
        self._unclaimed: list[dict[str, Any]] = []  # read, and not yet returned by `next`

    @classmethod
    async def attach(cls, port: int, token: str = TOKEN) -> RawGateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        gateway = cls(reader, writer)
        gateway.send({"type": "attach", "token": token})
        gateway.hello = await gateway.next("hello")
        return gateway

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(wire.encode(message))

    async def next(self, kind: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """The first message not yet returned of type `kind` (with these fields), reading on as need be."""
        def wanted(message: dict[str, Any]) -> bool:
            return message.get("type") == kind and all(message.get(k) == v for k, v in fields.items())

        for message in self._unclaimed:
            if wanted(message):
                self._unclaimed.remove(message)
                return message
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise EOFError(f"the supervisor closed the connection before a {kind} {fields}")
            message = json.loads(line)
            self.got.append(message)
            if wanted(message):
                return message
            self._unclaimed.append(message)

    async def settled(self) -> None:
        """Once this returns, everything the supervisor did with what was sent before has been
        done (messages from one connection are handled in order; a ping is answered at once)."""
        self.send({"type": "ping", "id": "settled"})
        await self.next("pong", id="settled")

    def call(self, call_id: Any, server: str, tool: str, **arguments: Any) -> None:
        self.send({"type": "call", "id": call_id, "server": server, "method": "tools/call",
                   "params": {"name": tool, "arguments": arguments}})

    def close(self) -> None:
        self.writer.close()


def answers(gateway: RawGateway) -> list[tuple[Any, str]]:
    return [(m["id"], text(m["result"])) for m in gateway.got if m.get("type") == "result"]


@pytest.fixture(scope="module")
def supervisor():
    with tempfile.TemporaryDirectory(prefix="mcpf-gws-", dir="/tmp") as d:
        directory = Path(d)
        fixture = write_fixture(directory)
        recording = directory / "recording_server.py"
        recording.write_text(RECORDING_SERVER)
        servers = [ServerConfig(name="fixture", argv=[sys.executable, str(fixture)]),
                   ServerConfig(name="rec", argv=[sys.executable, str(recording)], inference=True,
                                egress=["example.test"])]
        running = ListeningSupervisor(directory, servers, TOKEN)
        running.servers = servers
        config = json.loads(running.config_path.read_text())
        running.config_path.write_text(json.dumps({**config, "traces": True}))  # as when the gateway exports traces
        running.start()
        yield running
        running.stop()


@pytest.fixture
async def two(supervisor):
    """Gateways a and b, both attached (b last)."""
    client = SupervisorClient(token=TOKEN)  # waits while the supervisor starts and listens
    await client.connect("127.0.0.1", supervisor.port, timeout=120)
    await client.close()
    a = await RawGateway.attach(supervisor.port)
    b = await RawGateway.attach(supervisor.port)
    yield a, b
    a.close()
    b.close()


async def test_both_gateways_serve_calls_with_the_same_ids_each_getting_its_own_answers(two):
    a, b = two
    assert a.hello["servers"]["rec"]["state"] == b.hello["servers"]["rec"]["state"] == "ready"
    a.call(1, "rec", "wait", seconds=1.0, text="for a")
    b.call(1, "rec", "wait", seconds=0.1, text="for b")
    # Progress, with the same call id and the same progress token on both.
    for gateway in (a, b):
        gateway.send({"type": "call", "id": 2, "server": "fixture", "method": "tools/call",
                      "params": {"name": "slow", "arguments": {"seconds": 0.3}, "_meta": {"progressToken": "p"}}})
    for gateway in (a, b):
        await gateway.next("result", id=1)
        await gateway.next("result", id=2)
        await gateway.settled()
    assert sorted(answers(a)) == [(1, "for a"), (2, "done")]
    assert sorted(answers(b)) == [(1, "for b"), (2, "done")]
    for gateway in (a, b):
        progress = [m["params"]["progress"] for m in gateway.got if m.get("type") == "note" and m["id"] == 2]
        assert progress == [1, 2, 3]  # its own three, not the other's
        assert all(m["params"]["progressToken"] == "p" for m in gateway.got if m.get("type") == "note")


async def test_a_gateway_that_goes_away_cancels_its_calls_only(two):
    a, b = two
    b.call(7, "rec", "cancelled")
    before = json.loads((await b.next("result", id=7))["result"]["content"][0]["text"])
    a.call(1, "rec", "wait", seconds=60, text="never")
    await a.settled()  # a's call is with the server
    b.call(1, "rec", "wait", seconds=1.0, text="b's, completed")
    await b.settled()
    a.close()
    assert text((await b.next("result", id=1))["result"]) == "b's, completed"
    b.call(8, "rec", "cancelled")
    after = json.loads((await b.next("result", id=8))["result"]["content"][0]["text"])
    assert len(after) == len(before) + 1  # a's call, and only it, was cancelled
    # The other gateway goes on as before.
    b.call(9, "fixture", "echo", text="still here")
    assert text((await b.next("result", id=9))["result"]) == "still here"


async def test_a_servers_request_goes_to_the_gateway_of_its_call_and_only_it_answers(two):
    a, b = two
    b.call(1, "rec", "wait", seconds=60, text="keeps the server busy")  # two calls in flight: the ask must name its own
    a.call(1, "rec", "ask")
    ask = await a.next("ask")
    assert ask["id"] == 1 and ask["method"] == "roots/list" and ask["server"] == "rec"
    # b did not get it, and b answering it (another replica guessing the key) changes nothing.
    await b.settled()
    assert not [m for m in b.got if m.get("type") == "ask"]
    b.send({"type": "answer", "ask": ask["ask"], "result": {"roots": [{"uri": "file:///from-b"}]}})
    await b.settled()
    a.send({"type": "answer", "ask": ask["ask"], "result": {"roots": [{"uri": "file:///from-a"}]}})
    result = await a.next("result", id=1)
    assert json.loads(text(result["result"])) == {"roots": [{"uri": "file:///from-a"}]}
    assert not [m for m in b.got if m.get("type") == "result"]


async def test_an_ask_of_a_gateway_that_goes_away_is_refused_to_the_server(two):
    a, b = two
    a.call(1, "rec", "ask")
    await a.next("ask")
    b.call(1, "rec", "wait", seconds=0.5, text="b goes on")
    a.close()
    assert text((await b.next("result", id=1))["result"]) == "b goes on"
    # The server got an error for its request (it answers its call with it, which nobody awaits
    # now), and keeps serving.
    b.call(2, "fixture", "echo", text="after")
    assert text((await b.next("result", id=2))["result"]) == "after"
    assert not [m for m in b.got if m.get("type") == "ask"]


async def test_a_model_request_stays_with_the_gateway_it_went_to(two):
    """What no gateway asked for (a server asking the model endpoint) goes to the newest gateway,
    and stays with it: only its answer counts, and only its going away ends it."""
    a, b = two
    a.call(1, "rec", "model")
    ask = await b.next("model_ask")
    assert ask["server"] == "rec" and ask["path"] == "/api/generate"
    a.send({"type": "model_reply", "ask": ask["ask"], "status": 200, "data": "from a", "done": True})
    await a.settled()
    b.send({"type": "model_reply", "ask": ask["ask"], "status": 200, "data": '{"response": "from b"}', "done": True})
    assert text((await a.next("result", id=1))["result"]) == '200 {"response": "from b"}'
    assert not [m for m in a.got if m.get("type") == "model_ask"]
    a.call(2, "rec", "model")
    await b.next("model_ask")
    b.close()
    refused = text((await a.next("result", id=2))["result"])
    assert refused.startswith("503 ") and "the gateway went away" in refused
    a.call(3, "fixture", "echo", text="a goes on")
    assert text((await a.next("result", id=3))["result"]) == "a goes on"


async def test_a_tunnel_stays_with_the_gateway_it_went_to(two):
    """The egress proxy's tunnels are relayed as model requests are: by the newest gateway, and
    only by it."""
    a, b = two
    a.call(1, "rec", "fetch", url="http://example.test/page")
    opening = await b.next("tunnel_open")
    assert (opening["server"], opening["host"], opening["port"]) == ("rec", "example.test", 80)
    tunnel = opening["tunnel"]
    a.send({"type": "tunnel_opened", "tunnel": tunnel, "error": "a says no", "status": 403})
    await a.settled()
    b.send({"type": "tunnel_opened", "tunnel": tunnel, "error": None, "status": 200})
    request = base64.b64decode((await b.next("tunnel_data", tunnel=tunnel))["data"])
    assert request.startswith(b"GET /page HTTP/1.1\r\n")
    forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfrom a"
    a.send({"type": "tunnel_data", "tunnel": tunnel, "data": base64.b64encode(forged).decode()})
    a.send({"type": "tunnel_close", "tunnel": tunnel, "error": None})
    await a.settled()
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfrom b"
    b.send({"type": "tunnel_data", "tunnel": tunnel, "data": base64.b64encode(response).decode()})
    b.send({"type": "tunnel_close", "tunnel": tunnel, "error": None})
    assert text((await a.next("result", id=1))["result"]) == "200 from b"
    assert not [m for m in a.got if m.get("type", "").startswith("tunnel_")]
    # The gateway relaying a tunnel goes away: that tunnel ends, the other gateway goes on.
    a.call(2, "rec", "fetch", url="http://example.test/again")
    await b.next("tunnel_open")
    b.close()
    refused = text((await a.next("result", id=2))["result"])
    assert refused.startswith("502 ") and "the gateway went away" in refused
    a.call(3, "fixture", "echo", text="a goes on")
    assert text((await a.next("result", id=3))["result"]) == "a goes on"


async def test_a_servers_spans_go_to_one_gateway(two):
    """Each export is relayed once, to the newest gateway, not to every gateway (which would
    export the same spans twice)."""
    a, b = two
    a.call(1, "rec", "spans")
    assert text((await a.next("result", id=1))["result"]) == "200"
    spans = await b.next("spans")
    assert spans["server"] == "rec" and base64.b64decode(spans["data"]) == b"spans"
    await a.settled()
    assert not [m for m in a.got if m.get("type") == "spans"]


async def test_a_detach_of_one_gateway_leaves_the_others_served(two):
    """A detach pauses the sandbox's loopback services for a checkpoint, which a pod never takes:
    once the detaching gateway is gone, the others are served again."""
    a, b = two
    a.send({"type": "detach"})
    with pytest.raises(EOFError):
        await a.next("pong")
    b.call(1, "rec", "model")
    ask = await b.next("model_ask")
    b.send({"type": "model_reply", "ask": ask["ask"], "status": 200, "data": "{}", "done": True})
    assert text((await b.next("result", id=1))["result"]) == "200 {}"


async def test_pong_and_configure_answer_the_gateway_that_asked_and_server_news_reach_all(supervisor, two):
    a, b = two
    a.send({"type": "ping", "id": 41})
    b.send({"type": "ping", "id": 41})
    assert (await a.next("pong"))["id"] == (await b.next("pong"))["id"] == 41
    # A server more, then none more: each state change goes to both; the result to the asker.
    extra = ServerConfig(name="extra", argv=supervisor.servers[0].argv)
    b.send({"type": "configure", "id": "c1", "servers": [dataclasses.asdict(s) for s in (*supervisor.servers, extra)]})
    assert set((await b.next("result", id="c1"))["result"]["servers"]) == {"fixture", "rec", "extra"}
    b.send({"type": "configure", "id": "c2", "servers": [dataclasses.asdict(s) for s in supervisor.servers]})
    await b.next("result", id="c2")
    await a.next("server", server="extra", state="removed")
    await a.settled()
    states = [[m["state"] for m in gateway.got if m.get("type") == "server" and m["server"] == "extra"]
              for gateway in (a, b)]
    assert states[0] == states[1] and states[0][0] == "ready" and states[0][-1] == "removed"  # ready, stopped, removed
    assert not [m for m in a.got if m.get("type") == "result"]
    # A note about the session (not about one call) reaches every gateway too.
    a.call(5, "fixture", "grow", name="grown_here")
    await a.next("result", id=5)
    for gateway in (a, b):
        note = await gateway.next("note", method="notifications/tools/list_changed")
        assert note["id"] is None and note["server"] == "fixture"


async def test_a_connection_without_the_token_is_refused_beside_attached_gateways(supervisor, two):
    a, b = two
    for first in ({"type": "attach", "token": TOKEN + "x"}, {"type": "attach"}, {"type": "ping", "id": 1},
                  {"type": "call", "id": 1, "server": "fixture", "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"text": "sneaked in"}}}):
        assert await raw_exchange(supervisor.port, wire.encode(first)) == b""
    # A wrong token after a right attach on another connection changes nothing for either.
    a.call(1, "fixture", "echo", text="a")
    b.call(1, "fixture", "echo", text="b")
    assert text((await a.next("result", id=1))["result"]) == "a"
    assert text((await b.next("result", id=1))["result"]) == "b"


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the socket's timer")
async def test_an_attached_connection_is_kept_alive_so_a_vanished_replica_is_noticed(supervisor, two):
    """A replica whose node dies sends no FIN: the supervisor's TCP keepalive finds it gone."""
    listed = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{supervisor.port} )"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listed) >= 2 and all("timer:(keepalive," in line for line in listed), listed


async def test_at_most_so_many_gateways_stay_attached_the_oldest_dropped():
    with tempfile.TemporaryDirectory(prefix="mcpf-gws-", dir="/tmp") as d:
        running = ListeningSupervisor(Path(d), [], TOKEN)  # no servers: up at once
        running.start()
        try:
            client = SupervisorClient(token=TOKEN)
            await client.connect("127.0.0.1", running.port, timeout=120)
            gateways = [await RawGateway.attach(running.port) for _ in range(MAX_GATEWAYS)]
            # The client attached first: the last of these dropped it.
            await asyncio.wait_for(client.wait_disconnected(), 60)
            newest = await RawGateway.attach(running.port)
            with pytest.raises(EOFError):
                await gateways[0].next("pong")  # the oldest: closed
            for gateway in (gateways[1], gateways[-1], newest):
                await gateway.settled()
            for gateway in (*gateways, newest):
                gateway.close()
            await client.close()

            # Connections that never attach: one too many drops the oldest, and a gateway still gets in.
            waiting = []
            for _ in range(MAX_UNATTACHED + 1):
                waiting.append(await asyncio.open_connection("127.0.0.1", running.port))
            assert await asyncio.wait_for(waiting[0][0].read(), 60) == b""
            latest = await RawGateway.attach(running.port)
            await latest.settled()
            latest.close()
            for _, writer in waiting:
                writer.close()
        finally:
            running.stop()
