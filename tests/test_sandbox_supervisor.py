"""The supervisor and its client, run on the host: real processes, a real MCP server, a real socket.

The supervisor is plain Python; running it outside gVisor keeps these protocol
tests fast. tests/test_sandbox_backends.py runs the same supervisor as a sandbox's init.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sandbox.client import STATUS_METHOD, SandboxEvent, SupervisorClient
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.supervisor.config import ServerConfig, SupervisorConfig

# An MCP server made with the SDK, with a tool for each behaviour under test.
FIXTURE_SERVER = r'''
import asyncio, os, platform, socket, sys, time

import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("fixture", instructions="a server for tests")
count = 0


@server.tool()
def echo(text: str) -> str:
    return text


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    for step in range(1, 4):
        await ctx.report_progress(step, 3, f"step {step}")
        await asyncio.sleep(seconds / 3)
    return "done"


@server.tool()
async def chatty(ctx: Context) -> str:
    await ctx.info("working on it")
    return "said"


@server.tool()
async def sample(prompt: str, ctx: Context) -> str:
    result = await ctx.session.create_message(
        messages=[types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))],
        max_tokens=16,
    )
    return result.content.text


@server.tool()
async def sample_tied(prompt: str, ctx: Context) -> str:
    # Names the call it asks for (io.mcpfleet/relatedRequestId), as a server with several calls in flight must.
    request = types.CreateMessageRequest.model_validate({"method": "sampling/createMessage", "params": {
        "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}], "maxTokens": 16,
        "_meta": {"io.mcpfleet/relatedRequestId": ctx.request_context.request_id}}})
    result = await ctx.session.send_request(request, types.CreateMessageResult)
    return result.content.text


@server.tool()
def crash() -> str:
    os._exit(3)


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    server.add_tool(lambda: name, name=name, description="added at run time")
    await ctx.session.send_tool_list_changed()
    return "grown"


@server.tool()
def counter() -> int:
    global count
    count += 1
    return count


@server.tool()
def whoami() -> dict:
    return {
        "release": platform.release(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "home": os.environ.get("HOME"),
        "workspace": sorted(os.listdir("/workspace")) if os.path.isdir("/workspace") else None,
    }


@server.tool()
def write_file(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return "written"


@server.tool()
def read_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return f"error: {exc.strerror}"


@server.tool()
def connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3):
            return "connected"
    except OSError as exc:
        return f"failed: {exc}"


@server.tool()
def hog_memory(mb: int) -> str:
    chunks = []
    try:
        for _ in range(mb // 16):
            chunks.append(bytearray(16 * 1024 * 1024))
    except MemoryError:
        return f"MemoryError after {len(chunks) * 16} MiB"
    return f"allocated {len(chunks) * 16} MiB"


@server.tool()
def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter; returns its stdout (and stderr if it failed)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout + (f"\nexit {done.returncode}: {done.stderr}" if done.returncode else "")


@server.tool()
def fork_many(n: int) -> str:
    import subprocess

    children, error = [], None
    for _ in range(n):
        try:
            children.append(subprocess.Popen(["sleep", "30"]))
        except OSError as exc:
            error = exc.strerror
            break
    for child in children:
        child.kill()
        child.wait()
    return f"started {len(children)}" + (f", then: {error}" if error else "")


if __name__ == "__main__":
    server.run()
'''


BROKEN_SERVER = "import sys; print('no such luck', file=sys.stderr); sys.exit(7)"

# A server without the SDK, in raw JSON-RPC: it answers with the notifications it has received.
LISTENING_SERVER = r'''
import json, sys
seen = []
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        seen.append([message["method"], message.get("params")])
        continue
    result = {"protocolVersion": "2025-11-25", "capabilities": {}, "serverInfo": {"name": "raw", "version": "0"}}
    if message["method"] != "initialize":
        result = {"seen": seen}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
'''


def write_fixture(directory: Path) -> Path:
    path = directory / "fixture_server.py"
    path.write_text(FIXTURE_SERVER)
    return path


def text(result: dict) -> str:
    return result["content"][0]["text"]


def tool(client: SupervisorClient, name: str, server: str = "fixture", **arguments):
    """A tools/call through the supervisor (a coroutine)."""
    return client.request(server, "tools/call", {"name": name, "arguments": arguments})


def payload(result: dict) -> dict:
    """What a tool returning a dict returned (the SDK sends it as JSON text)."""
    return json.loads(text(result))


class RunningSupervisor:
    """`python -m sandbox.supervisor` as a plain host process, for the protocol tests."""

    def __init__(self, directory: Path, servers: list[ServerConfig], token: str = ""):
        self.socket = directory / "gateway.sock"
        self.config_path = directory / "supervisor.json"
        config = SupervisorConfig(
            socket=str(self.socket), servers=servers, env=dict(os.environ), init_timeout=30, token=token
        )
        config.write(self.config_path)
        self.log = open(directory / "supervisor.log", "ab")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.supervisor", str(self.config_path)], stdout=self.log, stderr=self.log
        )

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


TOKEN = "supervisor-token-for-tests"


@pytest.fixture(scope="module")
def workdir():
    # A short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mcpf-sup-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="module")
async def supervised(workdir: Path):
    fixture = write_fixture(workdir)
    supervisor = RunningSupervisor(
        workdir,
        [
            ServerConfig(name="fixture", argv=[sys.executable, str(fixture)]),
            ServerConfig(name="other", argv=[sys.executable, str(fixture)]),
            ServerConfig(name="broken", argv=[sys.executable, "-c", BROKEN_SERVER]),
            ServerConfig(name="raw", argv=[sys.executable, "-c", LISTENING_SERVER]),
        ],
        token=TOKEN,
    )
    client = SupervisorClient(supervisor.socket, token=TOKEN)
    await client.listen()
    supervisor.start()
    await client.wait_ready(60)
    yield supervisor, client
    await client.close()
    supervisor.stop()


async def wait_for_state(client: SupervisorClient, server: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.servers.get(server, {}).get("state") != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"{server} never became {state}: {client.servers.get(server)}")
        await asyncio.sleep(0.05)


PIPE = asyncio.subprocess.PIPE


def jsonrpc(message: dict) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode()


async def direct_call(fixture: Path, method: str, params: dict) -> dict:
    """The same request sent straight to the server over stdio, for comparison."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(fixture), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    for message in (
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": method, "params": params},
    ):
        proc.stdin.write((json.dumps(message) + "\n").encode())
    try:
        while True:
            message = json.loads(await proc.stdout.readline())
            if message.get("id") == 2:
                return message
    finally:
        proc.kill()
        await proc.wait()


async def test_hello_reports_every_server(supervised):
    _, client = supervised
    assert client.servers["fixture"]["state"] == "ready"
    assert client.servers["fixture"]["initialize"]["serverInfo"]["name"] == "fixture"
    broken = client.servers["broken"]
    assert broken["state"] in ("failed", "starting")
    catalog = await client.catalog()
    assert catalog["broken"]["tools"] == []


async def test_failed_server_explains_itself(supervised):
    _, client = supervised
    await wait_for_state(client, "broken", "failed")
    assert "exited with code 7" in client.servers["broken"]["error"]
    assert "no such luck" in client.servers["broken"]["error"]
    with pytest.raises(SandboxRpcError) as caught:
        await client.request("broken", "tools/list")
    assert "not running" in caught.value.message and "code 7" in caught.value.message


async def test_catalog_lists_tools_and_is_cached(supervised):
    _, client = supervised
    catalog = await client.catalog()
    fixture = catalog["fixture"]
    names = {t["name"] for t in fixture["tools"]}
    assert {"echo", "slow", "sample", "crash", "whoami"} <= names
    assert fixture["serverInfo"]["name"] == "fixture"
    assert fixture["instructions"] == "a server for tests"
    assert "tools" in fixture["capabilities"]
    assert fixture["state"] == "ready"
    again = await client.catalog()
    assert again["fixture"] is fixture


UNUSED_LIBRARIES = ("libssl", "libcrypto", "_ssl.", "_hashlib.", "liblzma", "libbz2")
"""What the supervisor never needs (no TLS, no compression) and keeps out of its memory (`sandbox.supervisor.__main__`)."""


async def test_the_supervisor_keeps_openssl_and_compression_libraries_out_of_its_memory(supervised):
    """An idle sandbox's memory is mostly its supervisor's (bench/fresh_memory.py), so it loads no
    library it never uses; the servers it starts are Pythons of their own and import them as usual."""
    supervisor, client = supervised
    maps = Path(f"/proc/{supervisor.process.pid}/maps").read_text()
    assert [lib for lib in UNUSED_LIBRARIES if lib in maps] == []
    code = "import hashlib, lzma, ssl; print(hashlib.sha256(lzma.compress(b'x')).hexdigest() != '', ssl.OPENSSL_VERSION[:7])"
    assert text(await tool(client, "run_python", code=code)).split() == ["True", "OpenSSL"]


async def test_result_is_passed_through_raw(supervised, workdir):
    _, client = supervised
    params = {"name": "whoami", "arguments": {}}
    through = await client.request("fixture", "tools/call", params)
    direct = (await direct_call(workdir / "fixture_server.py", "tools/call", params))["result"]
    assert through.keys() == direct.keys() == {"content", "isError"}
    assert payload(through).keys() == payload(direct).keys()
    assert through["isError"] is direct["isError"] is False
    params = {"name": "echo", "arguments": {"text": "héllo\nworld"}}
    echoed = await client.request("fixture", "tools/call", params)
    assert echoed == (await direct_call(workdir / "fixture_server.py", "tools/call", params))["result"]


async def test_jsonrpc_errors_keep_code_message_and_data(supervised, workdir):
    _, client = supervised
    with pytest.raises(SandboxRpcError) as caught:
        await client.request("fixture", "no/such_method", {})
    direct = (await direct_call(workdir / "fixture_server.py", "no/such_method", {}))["error"]
    assert caught.value.code == direct["code"] == -32601
    assert caught.value.message == direct["message"]
    assert caught.value.data == direct.get("data")


async def test_unknown_server(supervised):
    _, client = supervised
    with pytest.raises(SandboxRpcError) as caught:
        await client.request("nope", "tools/list")
    assert caught.value.code == -32602
    assert "nope" in caught.value.message
    assert "fixture" in caught.value.data["servers"]


async def test_progress_is_relayed_in_order_with_the_callers_token(supervised):
    _, client = supervised
    seen: list[tuple[str, dict]] = []

    async def on_notification(method, params):
        await asyncio.sleep(0.01)  # a slow relay must not reorder or lose anything
        seen.append((method, params))

    result = await client.request(
        "fixture",
        "tools/call",
        {"name": "slow", "arguments": {"seconds": 0.15}, "_meta": {"progressToken": "client-token"}},
        on_notification=on_notification,
    )
    assert text(result) == "done"
    assert [m for m, _ in seen] == ["notifications/progress"] * 3
    assert [p["progress"] for _, p in seen] == [1, 2, 3]
    assert {p["progressToken"] for _, p in seen} == {"client-token"}


async def test_same_progress_token_on_concurrent_calls_stays_apart(supervised):
    _, client = supervised
    seen: dict[int, list] = {0: [], 1: []}

    async def one(i: int) -> None:
        await client.request(
            "fixture",
            "tools/call",
            {"name": "slow", "arguments": {"seconds": 0.2}, "_meta": {"progressToken": 7}},
            on_notification=lambda m, p: seen[i].append(p["progress"]),
        )

    await asyncio.gather(one(0), one(1))
    assert seen == {0: [1, 2, 3], 1: [1, 2, 3]}


async def test_log_message_of_a_lone_call_is_tagged_with_it(supervised):
    _, client = supervised
    seen = []
    result = await client.request(
        "fixture", "tools/call", {"name": "chatty", "arguments": {}}, on_notification=lambda m, p: seen.append((m, p))
    )
    assert text(result) == "said"
    assert seen == [("notifications/message", {"level": "info", "data": "working on it"})]


async def test_sampling_request_is_answered_by_the_callers_handler(supervised):
    _, client = supervised
    asked = []

    async def on_request(method, params):
        asked.append(method)
        prompt = params["messages"][0]["content"]["text"]
        return {"role": "assistant", "content": {"type": "text", "text": prompt.upper()}, "model": "test-model"}

    result = await client.request(
        "fixture", "tools/call", {"name": "sample", "arguments": {"prompt": "hi there"}}, on_request=on_request
    )
    assert asked == ["sampling/createMessage"]
    assert text(result) == "HI THERE"


async def test_sampling_error_from_the_handler_reaches_the_server(supervised):
    _, client = supervised

    async def refuse(method, params):
        raise SandboxRpcError(-1, "user said no")

    # The SDK lets a sampling error escape the tool as the call's JSON-RPC error.
    with pytest.raises(SandboxRpcError) as caught:
        params = {"name": "sample", "arguments": {"prompt": "x"}}
        await client.request("fixture", "tools/call", params, on_request=refuse)
    assert (caught.value.code, caught.value.message) == (-1, "user said no")


async def test_server_requests_of_concurrent_calls_reach_the_call_they_name(supervised):
    """Over stdio nothing ties a server's request to a call; with several calls in flight, the one the
    request names in `_meta` gets it (a held input_required call stays in flight for minutes)."""
    _, client = supervised

    def answering(who):
        async def on_request(method, params):
            await asyncio.sleep(0.5)  # both calls are in flight when either is asked
            return {"role": "assistant", "content": {"type": "text", "text": f"{who}:{params['messages'][0]['content']['text']}"},
                    "model": "test-model"}
        return on_request

    results = await asyncio.gather(*(
        client.request("fixture", "tools/call", {"name": "sample_tied", "arguments": {"prompt": who}}, on_request=answering(who))
        for who in ("first", "second", "third")
    ))
    assert [text(r) for r in results] == ["first:first", "second:second", "third:third"]


async def test_fifty_concurrent_calls_on_one_channel(supervised):
    _, client = supervised
    words = [f"word-{i}" for i in range(80)]
    results = await asyncio.gather(
        *(tool(client, "echo", server=server, text=w) for w in words for server in ("fixture", "other"))
    )
    assert [text(r) for r in results] == [w for w in words for _ in (0, 1)]


async def test_client_notifications_reach_one_server_or_all(supervised):
    _, client = supervised
    await client.notify("raw", "notifications/roots/list_changed")
    await client.notify(None, "notifications/roots/list_changed", {"why": "everyone"})
    seen = (await client.request("raw", "anything/at_all"))["seen"]
    assert seen == [
        ["notifications/initialized", None],
        ["notifications/roots/list_changed", None],
        ["notifications/roots/list_changed", {"why": "everyone"}],
    ]


IMPOSTORS = [{"type": "hello", "servers": {}}, {"type": "hello", "token": "guess"}, {"type": "x"}]


@pytest.mark.parametrize("hello", IMPOSTORS)
async def test_only_the_supervisor_may_take_the_channel(supervised, hello):
    """Anything in the sandbox can reach the socket; without the token it is refused and changes nothing."""
    _, client = supervised
    reader, writer = await asyncio.open_unix_connection(str(client.socket_path))
    writer.write(jsonrpc(hello))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on it
    writer.close()
    assert client.connected
    assert text(await tool(client, "echo", text="undisturbed")) == "undisturbed"


async def test_large_messages_both_ways(supervised):
    _, client = supervised
    big = "0123456789abcdef" * (3 * 2**20 // 16)  # 3 MiB, far past asyncio's default line limit
    assert text(await tool(client, "echo", text=big)) == big


async def test_timeout_cancels_the_call(supervised):
    _, client = supervised
    with pytest.raises(TimeoutError):
        await client.request("fixture", "tools/call", {"name": "slow", "arguments": {"seconds": 5}}, timeout=0.2)
    assert text(await tool(client, "echo", text="still here")) == "still here"


async def test_list_changed_reaches_listeners_and_refreshes_the_catalog(supervised):
    _, client = supervised
    events: list[SandboxEvent] = []
    remove = client.add_listener(events.append)
    try:
        before = {t["name"] for t in (await client.catalog())["other"]["tools"]}
        assert "fresh" not in before
        await client.request("other", "tools/call", {"name": "grow", "arguments": {"name": "fresh"}})
        deadline = time.monotonic() + 5
        while not any(e.method == "notifications/tools/list_changed" for e in events):
            assert time.monotonic() < deadline, events
            await asyncio.sleep(0.01)
        assert [e.server for e in events if e.method == "notifications/tools/list_changed"] == ["other"]
        after = {t["name"] for t in (await client.catalog())["other"]["tools"]}
        assert after == before | {"fresh"}
    finally:
        remove()


async def test_child_crash_fails_its_calls_and_it_is_restarted(supervised):
    _, client = supervised
    events: list[SandboxEvent] = []
    remove = client.add_listener(events.append)
    try:
        first_pid = payload(await tool(client, "whoami"))["pid"]
        slow = asyncio.create_task(tool(client, "slow", seconds=3))
        await asyncio.sleep(0.1)
        with pytest.raises(SandboxRpcError) as caught:
            await tool(client, "crash")
        assert "exited with code 3" in caught.value.message and "restarted" in caught.value.message
        with pytest.raises(SandboxRpcError, match="exited with code 3"):
            await slow
        await wait_for_state(client, "fixture", "ready")
        again = await tool(client, "whoami")
        assert payload(again)["pid"] != first_pid
        states = [e.params["state"] for e in events if e.method == STATUS_METHOD and e.server == "fixture"]
        assert states[0] == "failed" and states[-1] == "ready"
    finally:
        remove()


async def test_detach_then_listen_again_reconnects(supervised):
    supervisor, client = supervised
    await client.detach()
    assert not client.connected
    assert not supervisor.socket.exists()
    with pytest.raises(SandboxUnavailable):
        await tool(client, "echo", text="x")
    await asyncio.sleep(0.3)
    await client.listen()
    await client.wait_ready(5)
    assert text(await tool(client, "counter")).isdigit()


async def test_a_new_gateway_gets_the_running_servers(supervised):
    """The gateway process restarts: a new client on the same socket path, the same children."""
    supervisor, client = supervised
    before = await tool(client, "counter")
    in_flight = asyncio.create_task(tool(client, "slow", seconds=2))
    await asyncio.sleep(0.1)
    await client.close()
    with pytest.raises(SandboxUnavailable):
        await in_flight
    successor = SupervisorClient(supervisor.socket, token=TOKEN)
    await successor.listen()
    await successor.wait_ready(5)
    after = await successor.request("fixture", "tools/call", {"name": "counter", "arguments": {}})
    assert int(text(after)) == int(text(before)) + 1  # same process: its memory survived
    # Hand the successor to the remaining tests.
    client.__dict__.update(successor.__dict__)


async def test_a_servers_environment_never_leaves_through_its_stderr(workdir):
    directory = workdir / "secretive"
    directory.mkdir()
    leaky = "import os, sys; print('token is', os.environ['API_TOKEN'], file=sys.stderr); sys.exit(1)"
    secret = "tok-7f3a9c1e5b"
    server = ServerConfig(name="leaky", argv=[sys.executable, "-c", leaky], env={"API_TOKEN": secret})
    supervisor = RunningSupervisor(directory, [server])
    client = SupervisorClient(supervisor.socket)
    await client.listen()
    supervisor.start()
    try:
        await client.wait_ready(30)
        assert not supervisor.config_path.exists()  # the supervisor keeps the environment in memory only
        error = client.servers["leaky"]["error"]
        assert "token is [redacted]" in error and secret not in error
        with pytest.raises(SandboxRpcError) as caught:
            await client.request("leaky", "tools/list")
        assert secret not in str(caught.value)
    finally:
        await client.close()
        supervisor.stop()
    log = (directory / "supervisor.log").read_text()
    assert "token is [redacted]" in log and secret not in log


async def test_supervisor_death_fails_calls_in_flight(workdir):
    directory = workdir / "dying"
    directory.mkdir()
    fixture = ServerConfig(name="fixture", argv=[sys.executable, str(write_fixture(directory))])
    supervisor = RunningSupervisor(directory, [fixture])
    client = SupervisorClient(supervisor.socket)
    await client.listen()
    supervisor.start()
    try:
        await client.wait_ready(60)
        call = asyncio.create_task(tool(client, "slow", seconds=5))
        await asyncio.sleep(0.2)
        supervisor.process.send_signal(signal.SIGKILL)
        with pytest.raises(SandboxUnavailable):
            await asyncio.wait_for(call, 5)
        assert not client.connected
    finally:
        await client.close()
        supervisor.stop()


async def test_supervisor_overhead_per_call(supervised, workdir):
    """Through the supervisor vs. the same call sent straight to a child, interleaved call by call.

    The median of the paired differences, best of three rounds: other work on the machine
    slows both sides alike and should not count against the supervisor.
    """
    _, client = supervised
    params = {"name": "echo", "arguments": {"text": "x"}}
    fixture = workdir / "fixture_server.py"
    proc = await asyncio.create_subprocess_exec(sys.executable, str(fixture), stdin=PIPE, stdout=PIPE)
    rounds = []
    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        proc.stdin.write(jsonrpc({"id": 0, "method": "initialize", "params": init}))
        await proc.stdout.readline()
        proc.stdin.write(jsonrpc({"method": "notifications/initialized"}))
        ids = iter(range(1, 10**6))
        for _ in range(3):
            differences = []
            for _ in range(150):
                started = time.perf_counter()
                await client.request("fixture", "tools/call", params)
                through = time.perf_counter() - started
                started = time.perf_counter()
                proc.stdin.write(jsonrpc({"id": next(ids), "method": "tools/call", "params": params}))
                json.loads(await proc.stdout.readline())
                differences.append(through - (time.perf_counter() - started))
            rounds.append(statistics.median(differences[20:]))
    finally:
        proc.kill()
        await proc.wait()
    print(f"\nsupervisor overhead per call (median of paired differences, per round): "
          f"{', '.join(f'{r * 1e3:.3f}' for r in rounds)} ms")
    assert min(rounds) < 0.001
