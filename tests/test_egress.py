"""Egress from a sandbox, end to end with real networking: a real runsc sandbox (no network of its
own), a tool server doing urllib through the supervisor's proxy on the sandbox's loopback, the
channel, the gateway's policy (`gateway.egress`), and test hosts in a network namespace this
module creates (a veth pair; an HTTPS and an HTTP server inside it).

The one stand-in is DNS: the gateway resolves the test's names through a table (`TableResolver`)
instead of the host's resolver, which knows none of them. Everything after the name is real:
sockets, addresses, routes, TLS.

The test host answers on 192.31.196.2, an address Python counts as globally routable (AS112's
prefix, routed here to the namespace for the module's duration), and on 10.231.96.2, a private one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import gateway.egress
from gateway.call_audit import CallAudit
from gateway.egress import SandboxEgress
from sandbox.bundle import TOOLS
from sandbox.manager import SandboxManager
from sandbox.servers import ServerSpec
from tests.test_sandbox_lifecycle import SERVERS, call, fleets, sh  # noqa: F401  (fleets is a fixture)
from tests.test_sandbox_supervisor import text

pytestmark = [
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip"),
]

PUBLIC = "192.31.196.2"
PUBLIC_HOST_SIDE = "192.31.196.1"
PRIVATE = "10.231.96.2"
PRIVATE_HOST_SIDE = "10.231.96.1"
API = "api.egress-test.example"
REVISION = "egress-r1"

# What the test host serves: its own address as the client reached it, the path, the Host header;
# /big is 2 MiB, to carry the tunnel's window many times over.
HOST_SERVER = r"""
import http.server, ssl, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/big":
            body = b"x" * (2 * 1024 * 1024)
        else:
            body = f"test host {self.connection.getsockname()[0]} {self.path} host={self.headers.get('Host')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
https = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
https.socket = context.wrap_socket(https.socket, server_side=True)
plain = http.server.ThreadingHTTPServer(("0.0.0.0", 80), Handler)
threading.Thread(target=plain.serve_forever, daemon=True).start()
print("ready", flush=True)
https.serve_forever()
"""

# The tool server with egress: urllib, the proxy from its environment, the test CA from its install.
FETCHER = """
import os, ssl, subprocess, sys, urllib.error, urllib.request
from mcp.server.mcpserver import MCPServer
server = MCPServer("fetcher")
HERE = os.path.dirname(os.path.abspath(__file__))

@server.tool(description="GET a URL through the environment's proxy")
def fetch(url: str, length_only: bool = False) -> str:
    context = ssl.create_default_context(cafile=os.path.join(HERE, "ca.pem"))
    try:
        with urllib.request.urlopen(url, context=context, timeout=30) as response:
            body = response.read()
            return f"{response.status} {len(body)}" if length_only else f"{response.status} {body.decode()}"
    except urllib.error.HTTPError as exc:
        return f"refused {exc.code} {exc.headers.get('X-Mcpfleet-Egress')}"
    except Exception as exc:
        return f"failed {type(exc).__name__}: {exc}"

@server.tool(description="GET a URL from a child process")
def fetch_in_child(url: str) -> str:
    code = "import os, ssl, sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], context=ssl.create_default_context(cafile=sys.argv[2])).read().decode())"
    done = subprocess.run([sys.executable, "-c", code, url, os.path.join(HERE, "ca.pem")], capture_output=True, text=True)
    return f"200 {done.stdout.strip()}" if done.returncode == 0 else f"failed {done.stderr[-300:]}"

@server.tool(description="The proxy's credentials: a careless server leaking them")
def leak_token() -> str:
    return os.environ.get("HTTPS_PROXY", "").partition("//")[2].rpartition("@")[0]

@server.tool(description="The proxy's address, without the credentials")
def proxy() -> str:
    url = os.environ.get("HTTPS_PROXY", "")
    return url.rpartition("@")[2]

server.run()
"""


# Code run by the exec server (no egress): a CONNECT to the proxy with the credentials it can guess.
CONNECT_PROBE = """
import base64, socket
host, port = {proxy!r}.split(":")
credentials = {credentials!r}
head = "CONNECT {target} HTTP/1.1\\r\\n"
if credentials is not None:
    head += "Proxy-Authorization: Basic " + base64.b64encode(credentials.encode()).decode() + "\\r\\n"
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall((head + "\\r\\n").encode())
    print(s.recv(200).decode().splitlines()[0])
"""


def python_inside(code: str) -> str:
    """A shell command that runs `code` with the sandbox's python3, quoting left out of the way."""
    return f"python3 -c \"import base64; exec(base64.b64decode('{base64.b64encode(code.encode()).decode()}'))\" 2>&1"


class TableResolver:
    """Stands in for DNS: the test's names, each answered from a list (the last one repeats)."""

    def __init__(self, table: dict[str, list[list[str]]]):
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answers = self.table.get(host)
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        seen = self.asked.count(host)
        return answers[min(seen, len(answers)) - 1]


class EgressServers:
    """The fixture servers plus `fetcher` (declaring `declared`), its code and CA put in the tools dir."""

    def __init__(self, ca: Path, declared: tuple[str, ...], *, with_fetcher: bool = True):
        self.ca = ca
        self.declared = declared
        self.with_fetcher = with_fetcher

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        if not self.with_fetcher:
            return tuple(SERVERS)
        code = f"import sys; sys.path.insert(0, '{TOOLS}/{REVISION}'); import fetcher_tool"
        fetcher = ServerSpec("fetcher", ("python", "-c", code), revision=REVISION, egress=self.declared)
        return (*SERVERS, fetcher)

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        tools_dir.mkdir(mode=0o755, exist_ok=True)
        (tools_dir / REVISION).mkdir(mode=0o755, exist_ok=True)
        (tools_dir / REVISION / "fetcher_tool.py").write_text(FETCHER)
        shutil.copy(self.ca, tools_dir / REVISION / "ca.pem")
        os.chmod(tools_dir / REVISION / "ca.pem", 0o644)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_certificate(work: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (also its own CA) and its key."""
    cert, key = work / "cert.pem", work / "key.pem"
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
        "-addext", f"subjectAltName=DNS:{name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyCertSign")
    return cert, key


@contextlib.contextmanager
def namespace_host(work: Path, code: str, *args: str, tag: str = "eg") -> Iterator[None]:
    """A network namespace answering on PUBLIC and PRIVATE (routed from here over a veth pair), running
    the Python `code` with `args` until the block ends; it prints "ready" once it listens."""
    tag = f"{tag}{os.getpid() % 100000}"
    ns, host_if, ns_if = f"mcpf-{tag}", f"v{tag}h", f"v{tag}n"
    (work / "host.py").write_text(code)
    server = None
    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        run("ip", "link", "set", ns_if, "netns", ns)
        run("ip", "addr", "add", f"{PUBLIC_HOST_SIDE}/29", "dev", host_if)
        run("ip", "addr", "add", f"{PRIVATE_HOST_SIDE}/24", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        for address in (f"{PUBLIC}/29", f"{PRIVATE}/24"):
            run("ip", "-n", ns, "addr", "add", address, "dev", ns_if)
        run("ip", "-n", ns, "link", "set", ns_if, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(work / "host.py"), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready", server.stderr.read() if server.stderr else ""
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture(scope="module")
def test_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A network namespace with the test host in it; yields its certificate (also its CA)."""
    work = tmp_path_factory.mktemp("egress-host")
    cert, key = make_certificate(work, API)
    with namespace_host(work, HOST_SERVER, str(cert), str(key)):
        yield cert


@pytest.fixture
def host_loopback_listener() -> Iterator[tuple[int, list[bytes]]]:
    """Something on the gateway host's loopback that must never hear from a sandbox."""
    heard: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                heard.append(conn.recv(100) or b"(connected)")
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1], heard
    stop.set()
    thread.join()
    listener.close()


async def egress_manager(fleet, servers: EgressServers, egress: SandboxEgress) -> SandboxManager:
    manager = SandboxManager(fleet.home, fleet.pool, fleet.backend, servers, lifecycle=fleet.lifecycle, egress=egress)
    await manager.start()
    fleet.managers.append(manager)
    return manager


async def fetch(sandbox, url: str, **options) -> str:
    return text(await call(sandbox, "fetch", server="fetcher", url=url, **options))


async def egress_entries(pool, calls: CallAudit, tenant: str, expect: int) -> list[tuple[str, str, str, dict]]:
    """The tenant's egress entries once `expect` are there (a connection is recorded as its tunnel
    closes, a moment after the tool has its answer), or after 10 s."""
    for _ in range(100):
        await calls.flush()
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT actor, target, outcome, detail FROM audit_entries WHERE action = 'egress.connect' AND tenant = %s ORDER BY id",
                (tenant,),
            )
            rows = [tuple(row) for row in await cur.fetchall()]
        if len(rows) >= expect:
            return rows  # type: ignore[return-value]
        await asyncio.sleep(0.1)
    return rows  # type: ignore[return-value]


async def test_a_declared_host_answers_and_nothing_else_is_reached(fleets, db_pool, test_host, host_loopback_listener):
    loopback_port, heard = host_loopback_listener
    resolver = TableResolver({
        API: [[PUBLIC]],
        "private.egress-test.example": [[PRIVATE]],
        "loop.egress-test.example": [["127.0.0.1"]],
        "meta.egress-test.example": [["169.254.169.254"]],
        "meta6.egress-test.example": [["fd00:ec2::254"]],
        "mixed.egress-test.example": [[PUBLIC, PRIVATE]],
        # Public when first asked, private after: each connection resolves once and goes where it vetted.
        "rebind.egress-test.example": [[PUBLIC], [PRIVATE]],
        "other.egress-test.example": [[PUBLIC]],
    })
    declared = (API, "private.egress-test.example", f"loop.egress-test.example:{loopback_port}",
                "meta.egress-test.example:80", "meta6.egress-test.example:80", "mixed.egress-test.example",
                "rebind.egress-test.example")
    calls = CallAudit()
    calls.start(db_pool)
    fleet = await fleets("egress")
    manager = await egress_manager(fleet, EgressServers(test_host, declared), SandboxEgress(calls, resolver=resolver))
    alice = await fleet.user("alice")
    try:
        sandbox = await manager.ensure(*alice)

        # The declared host answers over https (CONNECT, TLS checked against its name) and http.
        assert await fetch(sandbox, f"https://{API}/hello") == f"200 test host {PUBLIC} /hello host={API}"
        assert await fetch(sandbox, f"http://{API}/plain?x=1") == f"200 test host {PUBLIC} /plain?x=1 host={API}"
        # Larger than the window many times over: flow control carries it whole.
        assert await fetch(sandbox, f"https://{API}/big", length_only=True) == f"200 {2 * 1024 * 1024}"

        # Refused, each with a reason the tool can show.
        undeclared = await fetch(sandbox, "https://other.egress-test.example/")
        assert undeclared.startswith("failed") and "403" in undeclared and "not among the hosts" in undeclared, undeclared
        assert "refused 403" in (await fetch(sandbox, "http://other.egress-test.example/"))
        port_not_declared = await fetch(sandbox, f"https://{API}:8443/")
        assert "403" in port_not_declared and f"{API}:8443 is not among" in port_not_declared
        private = await fetch(sandbox, "https://private.egress-test.example/")
        assert "403" in private and f"refused address: {PRIVATE} is a private" in private, private
        loop = await fetch(sandbox, f"http://loop.egress-test.example:{loopback_port}/")
        assert loop.startswith("refused 403") and "127.0.0.1 is a private or loopback" in loop, loop
        for name, address in (("meta", "169.254.169.254"), ("meta6", "fd00:ec2::254")):
            answer = await fetch(sandbox, f"http://{name}.egress-test.example/")
            assert answer.startswith("refused 403") and f"{address} is link-local or a metadata address" in answer, answer
        mixed = await fetch(sandbox, "https://mixed.egress-test.example/")
        assert "403" in mixed and PRIVATE in mixed
        # Address literals are not declared hosts (a manifest cannot declare one).
        for literal in ("169.254.169.254", PRIVATE, PUBLIC):
            assert "not among the hosts" in await fetch(sandbox, f"http://{literal}/")
        # 127.0.0.1 is the sandbox's own loopback (NO_PROXY): nothing of the gateway host's is there.
        assert "Connection refused" in await fetch(sandbox, f"http://127.0.0.1:{loopback_port}/")
        # Rebinding: the first answer was public and the connection went there; the next answer is private and refused.
        assert (await fetch(sandbox, "http://rebind.egress-test.example/r")).startswith(f"200 test host {PUBLIC} /r")
        rebound = await fetch(sandbox, "http://rebind.egress-test.example/r")
        assert rebound.startswith("refused 403") and PRIVATE in rebound
        assert heard == []  # the gateway host's loopback heard nothing

        # A server without egress in the same sandbox: no proxy in its environment, no way out directly,
        # and the proxy refuses it without credentials of its own.
        proxy = text(await call(sandbox, "proxy", server="fetcher"))
        assert proxy.startswith("127.0.0.1:")
        env = await sh(sandbox, "env | grep -i proxy || echo none")
        assert env["stdout"].strip() == "none"
        direct = await sh(sandbox, f"python3 -c \"import socket; socket.create_connection(('{PUBLIC}', 443), timeout=5)\" 2>&1 | tail -1")
        assert "No route to host" in direct["stdout"] or "unreachable" in direct["stdout"], direct
        # The sandbox's only interface is its loopback (runsc --network=none), where the proxy listens.
        interfaces = await sh(sandbox, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        assert interfaces["stdout"].split() == ["lo"], interfaces
        for credentials in (None, "fetcher:guessed", "exec:guessed", "exec:"):
            attempt = await sh(sandbox, python_inside(CONNECT_PROBE.format(proxy=proxy, target=f"{API}:443", credentials=credentials)))
            assert attempt["stdout"].startswith("HTTP/1.1 407 "), (credentials, attempt)
        # The fetcher's token is in no environment a neighbour can read (gVisor shows /proc/PID/environ
        # to every uid: the launcher's pipe brought it, sandbox/supervisor/launch.py) ...
        stolen = await sh(sandbox, "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -m1 '^HTTPS_PROXY=' || echo none")
        assert stolen["stdout"].strip() == "none", stolen
        # ... and were it leaked (here by the fetcher itself), the proxy serves it only to the fetcher's own processes.
        token = text(await call(sandbox, "leak_token", server="fetcher"))
        assert token.startswith("fetcher:") and len(token) > 30
        attempt = await sh(sandbox, python_inside(CONNECT_PROBE.format(proxy=proxy, target=f"{API}:443", credentials=token)))
        assert attempt["stdout"].startswith("HTTP/1.1 407 ") and "is not server 'fetcher' or one of its children" in attempt["stdout"]
        # ... whereas a process the fetcher starts is its own.
        assert text(await call(sandbox, "fetch_in_child", server="fetcher", url=f"https://{API}/child")).startswith(
            f"200 test host {PUBLIC} /child")

        entries = await egress_entries(db_pool, calls, fleet.tenant, expect=17)
        ok = [e for e in entries if e[2] == "ok"]
        assert {e[1] for e in ok} == {f"{API}:443", f"{API}:80", "rebind.egress-test.example:80"}
        big = next(e for e in ok if e[1] == f"{API}:443" and e[3]["bytes_down"] > 2 * 1024 * 1024)
        assert big[0] == "alice" and big[3]["server"] == "fetcher" and big[3]["address"] == PUBLIC
        assert 0 < big[3]["bytes_up"] < 10_000
        refused = [e for e in entries if e[2] == "refused"]
        assert len(refused) >= 12 and all(e[3]["address"] is None and e[3]["error"] for e in refused)
        assert {"other.egress-test.example:443", "private.egress-test.example:443", "169.254.169.254:80"} <= {e[1] for e in refused}
        # The 407s never reached the gateway: no entry names the exec server.
        assert all(e[3]["server"] == "fetcher" for e in entries)
    finally:
        await calls.close()


async def test_egress_granted_to_a_running_sandbox_is_rate_limited_and_survives_hibernation(fleets, db_pool, test_host, monkeypatch):
    monkeypatch.setattr(gateway.egress, "REFUSALS_EVERY_S", 4.0)  # 10 s in earnest
    calls = CallAudit()
    calls.start(db_pool)
    fleet = await fleets("egress-rate")
    egress = SandboxEgress(calls, resolver=TableResolver({API: [[PUBLIC]]}), per_min=3)
    servers = EgressServers(test_host, (API,), with_fetcher=False)
    manager = await egress_manager(fleet, servers, egress)
    bob = await fleet.user("bob")
    try:
        sandbox = await manager.ensure(*bob)
        assert "fetcher" not in await sandbox.client.catalog()
        # Approved while the sandbox runs: the supervisor starts its proxy then.
        servers.with_fetcher = True
        assert await manager.ensure(*bob) is sandbox
        answers = [await fetch(sandbox, f"http://{API}/{i}") for i in range(5)]
        assert [a.split()[0] for a in answers] == ["200", "200", "200", "refused", "refused"]
        assert "429" in answers[3] and "over 3 connections a minute" in answers[3]
        # Refusals of one host:port are written once per 10 s: the second is counted into the next entry.
        entries = await egress_entries(db_pool, calls, fleet.tenant, expect=4)
        assert [e[2] for e in entries] == ["ok", "ok", "ok", "refused"] and "suppressed" not in entries[3][3]
        for _ in range(20):
            await fetch(sandbox, f"http://{API}/again")
        await asyncio.sleep(0.3)
        assert len(await egress_entries(db_pool, calls, fleet.tenant, expect=5)) == 4
        await asyncio.sleep(gateway.egress.REFUSALS_EVERY_S)
        assert (await fetch(sandbox, f"http://{API}/later")).startswith("refused 429")
        later = (await egress_entries(db_pool, calls, fleet.tenant, expect=5))[4]
        assert later[2] == "refused" and later[3]["suppressed"] == 21

        # The proxy's socket is on the sandbox's own loopback: the sandbox checkpoints and restores
        # with it, and the restored server's credentials still work.
        egress.per_min = 600
        counter = int(text(await call(sandbox, "counter")))
        assert await manager.hibernate(bob[0])
        resumed = await manager.ensure(*bob)
        assert int(text(await call(resumed, "counter"))) == counter + 1  # restored, not started afresh
        assert (await fetch(resumed, f"https://{API}/after")).startswith(f"200 test host {PUBLIC} /after")
    finally:
        await calls.close()
