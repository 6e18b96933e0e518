"""Attacks on the gateway's transport, each against a real `mcpfleet up` with its limits lowered:
one member opening sessions and GET streams until nobody else can connect; dodging the per-tool rate
limit with a made-up `Mcp-Name` header, and growing the limiter's memory with endless tool names;
slow clients holding connections with half-sent headers or a trickled body; a taken-over server
answering with a result far larger than anyone should buffer."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, text_of
from tests.conftest import Fleet, make_fleet

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

RATE_LIMITED = -32029
LEGACY = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
SESSIONS, STREAMS, TOOL_PER_MIN = 4, 3, 3
HEADER_S, BODY_S = 2, 3
RESULT_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Fleet]:
    running = make_fleet(
        tmp_path_factory,
        postgres_url,
        MCPFLEET_RATE_LIMIT_PER_MIN="0",
        MCPFLEET_TOOL_RATE_LIMIT_PER_MIN=str(TOOL_PER_MIN),
        MCPFLEET_MAX_SESSIONS_PER_USER=str(SESSIONS),
        MCPFLEET_MAX_STREAMS_PER_USER=str(STREAMS),
        MCPFLEET_HEADER_TIMEOUT_S=str(HEADER_S),
        MCPFLEET_BODY_TIMEOUT_S=str(BODY_S),
        MCPFLEET_MAX_RESULT_BYTES=str(RESULT_LIMIT),
    )
    running.start()
    yield running
    running.stop()


def headers(key: str, session: str | None = None, **extra: str) -> dict[str, str]:
    out = {**LEGACY, "Authorization": f"Bearer {key}", **extra}
    if session is not None:
        out["Mcp-Session-Id"] = session
    return out


def open_session(fleet: Fleet, key: str) -> httpx.Response:
    """A raw 2025-11-25 handshake; the response carries the new session's id."""
    response = httpx.post(fleet.mcp_url, json=INIT, headers=headers(key), timeout=30)
    if response.status_code == 200:
        session = response.headers["mcp-session-id"]
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        extra = {"MCP-Protocol-Version": "2025-11-25"}
        assert httpx.post(fleet.mcp_url, json=initialized, headers=headers(key, session, **extra), timeout=30).status_code == 202
    return response


def assert_refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == RATE_LIMITED and words in error["message"], error


def rss(fleet: Fleet) -> int:
    assert fleet.process is not None
    with open(f"/proc/{fleet.process.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


# -- 9: sessions and streams per user -------------------------------------------------------------


async def test_one_member_cannot_take_every_session_or_stream(edge: Fleet) -> None:
    bob, alice = edge.add_user("bob-sessions"), edge.add_user("alice-sessions")
    legacy = {"MCP-Protocol-Version": "2025-11-25"}
    sessions = []
    for _ in range(SESSIONS):
        opened = await asyncio.to_thread(open_session, edge, bob)
        assert opened.status_code == 200, opened.text
        sessions.append(opened.headers["mcp-session-id"])
    async with httpx.AsyncClient(timeout=60) as http:
        # A GET stream on each session: the last one is over the stream limit.
        streams = []
        for session in sessions:
            request = http.build_request("GET", edge.mcp_url, headers=headers(bob, session, Accept="text/event-stream", **legacy))
            streams.append(await http.send(request, stream=True))
        assert [r.status_code for r in streams] == [200] * STREAMS + [429] * (SESSIONS - STREAMS)
        await streams[-1].aread()
        assert_refused(streams[-1], f"too many open streams (limit {STREAMS})")

        # The last session is kept busy by a call: now no session of Bob's is idle, and a new one is refused.
        call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "exec__run", "arguments": {"command": "sleep 6"}}}
        busy = asyncio.create_task(http.post(edge.mcp_url, json=call, headers=headers(bob, sessions[-1], **legacy)))
        await asyncio.sleep(2)
        refused = await asyncio.to_thread(open_session, edge, bob)
        assert_refused(refused, f"too many open sessions, none of them idle (limit {SESSIONS})")
        assert refused.json()["id"] == 0

        # Alice is not held up by any of this.
        async with connect(edge.mcp_url, alice) as client:
            assert "exit code 0" in text_of(await client.call_tool("exec__run", {"command": "true"}))

        assert (await busy).status_code == 200
        for response in streams[:STREAMS]:
            await response.aclose()

    # With nothing in flight, Bob's oldest idle session gives way to a new one.
    deadline = time.monotonic() + 10
    while (reopened := await asyncio.to_thread(open_session, edge, bob)).status_code == 429 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert reopened.status_code == 200, reopened.text
    ping = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
    statuses = [httpx.post(edge.mcp_url, json=ping, headers=headers(bob, s, **legacy), timeout=10).status_code for s in sessions]
    assert sorted(statuses) == [200] * (SESSIONS - 1) + [404], statuses


def test_a_flood_of_sessions_leaves_at_most_the_limit_open(edge: Fleet) -> None:
    flooder, other = edge.add_user("flood-sessions"), edge.add_user("other-sessions")
    opened = [open_session(edge, flooder) for _ in range(40)]
    assert all(r.status_code == 200 for r in opened)  # each new one closes the oldest idle one
    alive = 0
    for response in opened:
        session = response.headers["mcp-session-id"]
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        answer = httpx.post(edge.mcp_url, json=ping, timeout=10,
                            headers=headers(flooder, session, **{"MCP-Protocol-Version": "2025-11-25"}))
        alive += answer.status_code == 200
    assert alive == SESSIONS
    assert open_session(edge, other).status_code == 200
    assert "closing their oldest idle one" in edge.log()


# -- 10: the per-tool rate limit --------------------------------------------------------------------


def test_a_made_up_mcp_name_does_not_dodge_the_per_tool_limit(edge: Fleet) -> None:
    key = edge.add_user("name-dodger")
    session = open_session(edge, key).headers["mcp-session-id"]
    statuses = []
    for i in range(TOOL_PER_MIN + 3):
        body = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "workspace__list_dir", "arguments": {}}}
        extra = {"MCP-Protocol-Version": "2025-11-25", "Mcp-Method": "tools/call", "Mcp-Name": secrets.token_hex(8)}
        response = httpx.post(edge.mcp_url, json=body, headers=headers(key, session, **extra), timeout=60)
        statuses.append(response.status_code)
    assert statuses[:TOOL_PER_MIN] == [200] * TOOL_PER_MIN and statuses[TOOL_PER_MIN:] == [429] * 3, statuses
    # Another tool still has its own tokens.
    body = {"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "exec__run", "arguments": {"command": "true"}}}
    assert httpx.post(edge.mcp_url, json=body, timeout=60,
                      headers=headers(key, session, **{"MCP-Protocol-Version": "2025-11-25"})).status_code == 200


def test_endless_tool_names_do_not_grow_the_gateway(edge: Fleet) -> None:
    key = edge.add_user("name-sprayer")
    name_bytes, count = 128 * 1024, 300

    def spray(n: int) -> None:
        with httpx.Client(timeout=30, headers=headers(key)) as http:
            for _ in range(n):
                name = secrets.token_hex(name_bytes // 2)
                body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}
                assert http.post(edge.mcp_url, json=body).status_code != 429

    spray(20)  # warm up the request path
    before = rss(edge)
    spray(count)
    grown = rss(edge) - before
    # Each name is 128 KiB: a limiter keyed on them would hold some 37 MiB by now.
    assert grown < 12 * 1024 * 1024, f"the gateway grew by {grown >> 20} MiB"


# -- 12: slow clients ------------------------------------------------------------------------------


def raw_socket(fleet: Fleet) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", fleet.port), timeout=30)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the gateway closed the connection within `seconds`, and what it said first."""
    sock.settimeout(seconds)
    said = b""
    try:
        while chunk := sock.recv(4096):
            said += chunk
        return True, said
    except (TimeoutError, socket.timeout):
        return False, said
    except ConnectionResetError:
        return True, said


def test_half_sent_headers_and_a_trickled_body_are_cut_off(edge: Fleet) -> None:
    key = edge.add_user("slowloris")
    partial = [raw_socket(edge) for _ in range(100)]
    for sock in partial:
        sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    silent = raw_socket(edge)  # connects and says nothing at all

    trickled = raw_socket(edge)
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    trickled.sendall(
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    started = time.monotonic()
    cut, said = False, b""
    for byte in body:
        try:
            trickled.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            cut = True
            break
        closed, said = closed_within(trickled, 1)
        if closed:
            cut = True
            break
        if time.monotonic() - started > BODY_S + 5:
            break
    assert cut and time.monotonic() - started < BODY_S + 3, "a trickled body was still being read"
    assert b"200 OK" not in said

    for sock in [*partial, silent]:
        closed, said = closed_within(sock, HEADER_S + 3)
        assert closed, "a connection with half-sent headers was kept open"
        sock.close()
    assert b"408" in said or said == b""


async def test_a_long_lived_stream_outlasts_the_deadlines(edge: Fleet) -> None:
    key = edge.add_user("listener")
    session = open_session(edge, key).headers["mcp-session-id"]
    async with httpx.AsyncClient(timeout=60) as http:
        extra = {"Accept": "text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
        request = http.build_request("GET", edge.mcp_url, headers={**headers(key, session), **extra})
        response = await http.send(request, stream=True)
        assert response.status_code == 200
        await asyncio.sleep(HEADER_S + BODY_S + 2)
        # Still open: a request on the same session is answered, and the stream has not ended.
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        answer = await http.post(edge.mcp_url, json=ping, headers=headers(key, session, **{"MCP-Protocol-Version": "2025-11-25"}))
        assert answer.status_code == 200
        assert not response.is_closed
        await response.aclose()


# -- 13: large results ----------------------------------------------------------------------------


async def test_a_result_over_the_limit_is_a_clear_error(edge: Fleet) -> None:
    key = edge.add_user("big-output")
    async with connect(edge.mcp_url, key) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("exec__run", {"command": "head -c 1000000 /dev/zero | tr '\\0' a"})
        assert f"larger than the gateway's limit of {RESULT_LIMIT} bytes" in refused.value.error.message
        # The channel is fine: the next call works.
        assert "exit code 0" in text_of(await client.call_tool("exec__run", {"command": "true"}))


# The exec server keeps its MCP stdout on the second pipe it dup()ed at start (mcp_servers/stdio.py
# moves the wire off fds 0 and 1). A shell it runs shares its uid and sees that pipe in /proc, but the
# pipe was made by the supervisor, as root, before it started the server under its own uid: opening it
# again through /proc is refused, so the shell cannot answer for its server.
SERVER_STDOUT = "pipe=/proc/$PPID/fd/$(ls /proc/$PPID/fd | sort -n | while read fd; do case $fd in 0|1|2) ;; *) " \
    "case $(readlink /proc/$PPID/fd/$fd) in pipe:*) echo $fd;; esac;; esac; done | sed -n 2p)\n"

HIJACK = SERVER_STDOUT + """
i=1
while [ $i -le 60 ]; do
  printf '{"jsonrpc":"2.0","id":%d,"result":{"content":[{"type":"text","text":"hijacked %d"}]}}\\n' $i $i > $pipe
  i=$((i+1))
done
"""


def call(fleet: Fleet, key: str, session: str, tool: str, arguments: dict) -> dict:
    """A tools/call on a raw 2025-11-25 session; the JSON-RPC answer, read off the SSE response."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    response = httpx.post(fleet.mcp_url, json=body, timeout=180,
                          headers=headers(key, session, **{"MCP-Protocol-Version": "2025-11-25"}))
    assert response.status_code == 200, response.text
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return json.loads(data[-1])


def test_a_command_cannot_answer_for_its_server(edge: Fleet) -> None:
    key = edge.add_user("taken-over")
    session = open_session(edge, key).headers["mcp-session-id"]
    assert "exit code 0" in call(edge, key, session, "exec__run", {"command": "true"})["result"]["content"][0]["text"]
    # The shell tries to write answers for every id its server may be at: it cannot reach the server's pipe.
    answer = call(edge, key, session, "exec__run", {"command": HIJACK})["result"]
    text = answer["content"][0]["text"]
    assert not text.startswith("hijacked"), text
    stderr = answer["structuredContent"]["stderr"]
    assert "cannot create /proc/" in stderr and "Permission denied" in stderr, answer
    # The server and its channel keep serving.
    listed = call(edge, key, session, "workspace__list_dir", {"path": "."})
    assert "result" in listed and not listed["result"].get("isError"), listed


async def test_a_huge_line_on_the_channel_is_skipped_as_it_arrives() -> None:
    """What a taken-over server's 60 MB answer meets at the gateway: the channel reader skips a line over
    its limit while it streams in, never holding it whole, tells of its start, and reads on."""
    import tracemalloc

    from sandbox.channel import LineReader

    reader = asyncio.StreamReader()
    heads: list[bytes] = []
    lines = LineReader(reader, RESULT_LIMIT, heads.append, lambda head: False)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        first = asyncio.ensure_future(lines.next())  # reads as the bytes come, as the channel client does
        reader.feed_data(b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"')
        for _ in range(60):
            reader.feed_data(b"a" * 2**20)
            for _ in range(8):  # the reader's turn to take what came
                await asyncio.sleep(0)
        reader.feed_data(b'"}]}}\n{"jsonrpc":"2.0","id":8,"result":{}}\n')
        reader.feed_eof()
        assert await first == b'{"jsonrpc":"2.0","id":8,"result":{}}'
        assert await lines.next() is None
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert len(heads) == 1 and heads[0].startswith(b'{"jsonrpc":"2.0","id":7')
    assert peak < 16 * 2**20, f"the reader held {peak >> 20} MiB"
