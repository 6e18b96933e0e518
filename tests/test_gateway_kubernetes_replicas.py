"""Two gateway replicas on the kubernetes backend share every 2025-11-25 session (gateway/session_routes.py),
and every 2026-07-28 call held waiting for its client's input (gateway/input_required.py).

Two real `mcpfleet up` processes on one database, each with MCPFLEET_REPLICA_ADDRESS (its own port
here; a pod's IP and port in a cluster), as a Deployment's replicas behind a Service. The test plays
the Service: it sends each request of one session to the replica it chooses.

The Kubernetes API server is a STAND-IN (kmock, tests/kube_sandboxes.py says what it does and does
not prove) and the test plays the operator, with real supervisors listening on loopback TCP as the
pods, as in tests/test_gateway_kubernetes.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from mcp.server.request_state import AESGCMRequestStateCodec

from gateway.input_required import HeldCallRoutes
from gateway.session_routes import HOP_HEADER, SessionSeal
from registry.service import BUILTIN_NAMESPACE, product_version
from tests.clients import connect
from tests.conftest import Fleet, free_port, make_fleet
from tests.kube_sandboxes import KEY, NS, Operator, PodSupervisor, spec_pod, write_kubeconfig
from tests.test_gateway_kubernetes import kube, workdir  # noqa: F401  (the stand-in API server and the pods' directory, per module)
from tests.test_telemetry import receiver, traceparent  # noqa: F401  (a stand-in OTLP collector)

WITHIN = 300.0
"""Each test's bound: a wait that never ends fails the test instead of hanging it."""
LEGACY = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
VERSION = {"MCP-Protocol-Version": "2025-11-25"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}


@pytest.fixture(scope="module")
async def replicas(kube, workdir, receiver, tmp_path_factory, postgres_url) -> AsyncIterator[tuple[Fleet, Fleet]]:
    """Two gateways of one fleet (one database, one sandbox key), each naming its own address,
    exporting their traces to the receiver (tests/test_telemetry.py's stand-in for a collector)."""
    config = tmp_path_factory.mktemp("k8s-config")
    key_file = config / "sandbox.key"
    key_file.write_bytes(KEY + b"\n")
    first = make_fleet(
        tmp_path_factory, postgres_url,
        MCPFLEET_SANDBOX_BACKEND="kubernetes", MCPFLEET_K8S_NAMESPACE=NS, MCPFLEET_SANDBOX_KEY_FILE=str(key_file),
        KUBECONFIG=str(write_kubeconfig(config / "kubeconfig", kube)), MCPFLEET_CONFORMANCE="on",
        PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "runsc").exists()),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100",
        MCPFLEET_SESSION_SECRET="one secret for every replica of the fleet, 0123456789",
    )  # fmt: skip
    first.env["MCPFLEET_REPLICA_ADDRESS"] = f"127.0.0.1:{first.port}"
    port = free_port()
    home = tmp_path_factory.mktemp("replica")
    second = Fleet(home=home, database_url=first.database_url, port=port, env={
        **first.env, "MCPFLEET_HOME": str(home), "MCPFLEET_PORT": str(port), "MCPFLEET_REPLICA_ADDRESS": f"127.0.0.1:{port}"})
    try:
        await asyncio.to_thread(first.start)  # the schema first, then the second on it
        await asyncio.to_thread(second.start)
        yield first, second
    finally:
        for fleet in (first, second):
            await asyncio.to_thread(fleet.stop)  # in a thread: the stand-in answers it meanwhile
        # A replica killed outright (the last test) leaves its embedded OpenBao behind: stopped here.
        for process in psutil.process_iter(["cmdline"]):
            if any(str(second.home) in part for part in process.info["cmdline"] or ()):
                process.terminate()


def operator(kube, workdir: Path, *users: str) -> Operator:
    return Operator(kube, workdir, spec_pod, pod=PodSupervisor, only=frozenset(f"default-{u}" for u in users))


def messages(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer, whether plain JSON or an SSE stream."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    return [response.json()] if response.content else []


class Session:
    """One client's 2025-11-25 session, each request sent to the replica the test names."""

    def __init__(self, http: httpx.AsyncClient, key: str):
        self.http = http
        self.key = key
        self.id: str | None = None
        self.next_id = 0

    def headers(self, **extra: str) -> dict[str, str]:
        out = {**LEGACY, **VERSION, "Authorization": f"Bearer {self.key}", **extra}
        if self.id is not None:
            out["Mcp-Session-Id"] = self.id
        return out

    async def open(self, replica: Fleet) -> None:
        opened = await self.http.post(replica.mcp_url, json=INIT, headers={**LEGACY, "Authorization": f"Bearer {self.key}"})
        assert opened.status_code == 200, opened.text
        self.id = opened.headers["mcp-session-id"]
        done = await self.post(replica, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert done.status_code == 202, done.text

    async def post(self, replica: Fleet, message: dict[str, Any], **extra: str) -> httpx.Response:
        return await self.http.post(replica.mcp_url, json=message, headers=self.headers(**extra))

    async def request(self, replica: Fleet, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        response = await self.post(replica, {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}})
        assert response.status_code == 200, response.text
        (answer,) = [m for m in messages(response) if m.get("id") == self.next_id]
        assert "result" in answer, answer
        return answer["result"]

    async def call(self, replica: Fleet, tool: str, **arguments: Any) -> str:
        result = await self.request(replica, "tools/call", {"name": tool, "arguments": arguments})
        assert not result.get("isError"), result
        return "\n".join(block.get("text", "") for block in result["content"])


ELICIT = "conformance__test_input_required_result_elicitation"
REVISION = "2026-07-28"
TASKS = "io.modelcontextprotocol/tasks"


async def stateless(http: httpx.AsyncClient, replica: Fleet, key: str, params: dict[str, Any],
                    method: str = "tools/call") -> dict[str, Any]:
    """One 2026-07-28 request with no session (as tests/test_input_required.py and test_mcp_tasks.py
    send them, the tasks extension declared): its JSON-RPC answer."""
    meta = {"io.modelcontextprotocol/protocolVersion": REVISION,
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "sampling": {}, "extensions": {TASKS: {}}},
            "io.modelcontextprotocol/clientInfo": {"name": "replica-tests", "version": "1"}}
    response = await http.post(replica.mcp_url, json={"jsonrpc": "2.0", "id": 3, "method": method,
                                                       "params": {**params, "_meta": meta}}, headers={
        "Authorization": f"Bearer {key}", "MCP-Protocol-Version": REVISION, "Mcp-Method": method,
        "Mcp-Name": params.get("name") or params["taskId"], "Accept": "application/json, text/event-stream"})
    answers = [m for m in messages(response) if "result" in m or "error" in m]
    assert answers and answers[-1]["id"] == 3, response.text[-500:]
    return answers[-1]


async def ask_name(http: httpx.AsyncClient, replica: Fleet, key: str) -> str:
    """Round one of the elicitation fixture on `replica`: the requestState its retry must bring."""
    answer = await stateless(http, replica, key, {"name": ELICIT, "arguments": {}})
    assert "result" in answer, answer
    result = answer["result"]
    assert result["resultType"] == "input_required" and "user_name" in result["inputRequests"], result
    return result["requestState"]


async def answer_name(http: httpx.AsyncClient, replica: Fleet, key: str, state: str, name: str) -> dict[str, Any]:
    responses = {"user_name": {"action": "accept", "content": {"name": name}}}
    return await stateless(http, replica, key, {"name": ELICIT, "arguments": {}, "inputResponses": responses,
                                                "requestState": state})


def route_of(session_id: str) -> str:
    route = session_id.split(".")[1]
    return base64.urlsafe_b64decode(route + "=" * (-len(route) % 4)).decode()


async def test_one_session_is_served_by_both_replicas_in_turn(replicas, kube, workdir, receiver):
    """Opened on the first replica; tools/list, tools/call, the GET stream and DELETE sent to either."""
    first, second = replicas
    async with asyncio.timeout(WITHIN):
        rosa = await asyncio.to_thread(first.add_user, "rosa")
        admin = await asyncio.to_thread(first.add_user, "rosa-admin", "default", "admin")
        async with operator(kube, workdir, "rosa") as played, httpx.AsyncClient(timeout=60) as http:
            session = Session(http, rosa)
            await session.open(first)
            assert session.id is not None and route_of(session.id) == f"127.0.0.1:{first.port}"
            names = {t["name"] for t in (await session.request(second, "tools/list"))["tools"]}
            assert {"workspace__write_file", "workspace__read_file", "conformance__test_simple_text"} <= names
            await session.call(first, "workspace__write_file", path="turns.txt", content="written through one")
            assert "written through one" in await session.call(second, "workspace__read_file", path="turns.txt")
            await session.call(second, "workspace__write_file", path="turns.txt", content="and the other")
            assert "and the other" in await session.call(first, "workspace__read_file", path="turns.txt")
            assert played.started == 1  # one pod for the user, whichever replica served
            # What the hop costs, printed (no wall-clock assertion on a shared machine): ping on the
            # owner and through the other replica, alternately.
            took: dict[str, list[float]] = {"owner": [], "hop": []}
            for _ in range(20):
                for where, replica in (("owner", first), ("hop", second)):
                    started = time.perf_counter()
                    await session.request(replica, "ping")
                    took[where].append(time.perf_counter() - started)
            print("ping median ms: " + ", ".join(f"{k} {sorted(v)[len(v) // 2] * 1000:.1f}" for k, v in took.items()))

            # One trace through the hop: the owner's span is the child of the other replica's.
            header, trace_id, client_span = traceparent()
            session.next_id += 1
            call = {"jsonrpc": "2.0", "id": session.next_id, "method": "tools/call",
                    "params": {"name": "workspace__list_dir", "arguments": {"path": "."}}}
            assert (await session.post(second, call, traceparent=header)).status_code == 200
            spans = await asyncio.to_thread(receiver.trace, trace_id, "tools/call workspace__list_dir")
            (passed_on,) = [s for s in spans if s["name"] == "POST /mcp" and s["parent"] == client_span]
            (served,) = [s for s in spans if s["name"] == "POST /mcp" and s["parent"] == passed_on["span_id"]]
            assert [s["parent"] for s in spans if s["name"] == "tools/call workspace__list_dir"] == [served["span_id"]]

            # The session's GET stream through the replica that does not hold it: a change of what
            # rosa may use (an approval revoked) reaches it from the one that does.
            listen = http.build_request("GET", second.mcp_url, headers=session.headers(Accept="text/event-stream"))
            stream = await http.send(listen, stream=True)
            try:
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
                await asyncio.sleep(1.0)  # the owner has the stream before anything is published on it
                path = f"/registry/v1/servers/{BUILTIN_NAMESPACE}/conformance/versions/{product_version()}/revoke"
                revoked = await http.post(second.base_url + path, json={}, headers={"Authorization": f"Bearer {admin}"})
                assert revoked.status_code == 200, revoked.text
                heard: list[str] = []
                async with asyncio.timeout(60):
                    async for line in stream.aiter_lines():
                        if line.startswith("data:"):
                            heard.append(json.loads(line[5:]).get("method"))
                            if "notifications/tools/list_changed" in heard:
                                break
            finally:
                await stream.aclose()
            assert "notifications/tools/list_changed" in heard, heard
            # Closed by the client, the stream is closed on the owner too: a session has one GET
            # stream at a time (409 while another is open), and a new one opens on the owner itself.
            deadline = time.monotonic() + 60
            while True:
                async with http.stream("GET", first.mcp_url, headers=session.headers(Accept="text/event-stream")) as again:
                    if again.status_code == 200:
                        break
                    assert again.status_code == 409 and time.monotonic() < deadline, await again.aread()
                await asyncio.sleep(0.2)
            names = {t["name"] for t in (await session.request(second, "tools/list"))["tools"]}
            assert "conformance__test_simple_text" not in names and "workspace__read_file" in names

            # Ending the session through the other replica ends it where it lives.
            ended = await http.delete(second.mcp_url, headers=session.headers())
            assert ended.status_code == 200, ended.text
            gone = await session.post(first, {"jsonrpc": "2.0", "id": 99, "method": "tools/list"})
            assert gone.status_code == 404, gone.text

            # 2026-07-28 requests carry no session: each replica serves them itself.
            for replica in (first, second):
                async with connect(replica.mcp_url, rosa, mode="2026-07-28") as client:
                    assert "workspace__read_file" in {t.name for t in (await client.list_tools()).tools}


async def test_a_client_cannot_route_a_session_nor_use_another_users(replicas, kube, workdir):
    """A forged route, another user's session id, a forged replica hop, no credentials: each is
    refused, and no replica connects to the address a client wrote."""
    first, second = replicas
    async with asyncio.timeout(WITHIN):
        sam = await asyncio.to_thread(first.add_user, "sam")
        mallory = await asyncio.to_thread(first.add_user, "mallory")
        trapped: list[str] = []

        async def trap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            trapped.append(str(writer.get_extra_info("peername")))
            writer.close()

        server = await asyncio.start_server(trap, "127.0.0.1", 0)
        trap_address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, operator(kube, workdir, "sam"), httpx.AsyncClient(timeout=60) as http:
            session = Session(http, sam)
            await session.open(second)
            assert session.id is not None
            sdk_id, route, mac = session.id.split(".")
            await session.request(first, "tools/list")  # the genuine id works through the other replica

            async def as_(key: str, session_id: str, replica: Fleet, **extra: str) -> httpx.Response:
                headers = {**LEGACY, **VERSION, "Authorization": f"Bearer {key}", "Mcp-Session-Id": session_id, **extra}
                return await http.post(replica.mcp_url, json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"}, headers=headers)

            trap_route = base64.urlsafe_b64encode(trap_address.encode()).rstrip(b"=").decode()
            forged = [
                f"{sdk_id}.{trap_route}.{mac}",  # the route swapped for the client's own address
                SessionSeal(b"not-the-fleet-key-0123456789", trap_address).seal(sdk_id, "anyone"),  # sealed by a stranger
                sdk_id,  # the SDK's bare id, on the replica that holds it
                f"{sdk_id}.{route}.{'A' * len(mac)}",
            ]
            for session_id in forged:
                for replica in (first, second):
                    refused = await as_(sam, session_id, replica)
                    assert refused.status_code == 404 and "Session not found" in refused.json()["error"]["message"], refused.text
            # Another user with sam's genuine id, through either replica: not theirs.
            for replica in (first, second):
                refused = await as_(mallory, session.id, replica)
                assert refused.status_code == 404 and "not one of your sessions" in refused.text, refused.text
            # No credentials with a genuine id: refused where it arrives, never passed on.
            unauthenticated = await http.post(first.mcp_url, json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"},
                                              headers={**LEGACY, **VERSION, "Mcp-Session-Id": session.id})
            assert unauthenticated.status_code == 401, unauthenticated.text
            assert trapped == [], "a replica connected to the address a client wrote"

            # The hop header is the replicas' own: made up, made with another key, stale, or made for
            # another request, it is refused before anything reads the request.
            scope = {"method": "POST", "path": "/mcp", "headers": [(b"mcp-session-id", session.id.encode())]}
            genuine = SessionSeal(KEY, "x:1")
            hops = [b"1.2.3", SessionSeal(b"not-the-fleet-key-0123456789", "x:1").hop(scope, "203.0.113.9"),
                    genuine.hop(scope, "203.0.113.9", now=time.time() - 3600),
                    genuine.hop({**scope, "path": "/registry/v1/servers"}, "203.0.113.9")]
            for hop in hops:
                refused = await as_(sam, session.id, second, **{HOP_HEADER.decode(): hop.decode()})
                assert refused.status_code == 403 and "replica hop header" in refused.text, (hop, refused.text)
            # With the fleet's key (only replicas have it) the same request passes: the key is what refused the others.
            passed = await as_(sam, session.id, second, **{HOP_HEADER.decode(): genuine.hop(scope, "203.0.113.9").decode()})
            assert passed.status_code == 200, passed.text
            # A hop that reaches a replica not holding the session is never passed on again.
            again = await as_(sam, session.id, first, **{HOP_HEADER.decode(): genuine.hop(scope, "203.0.113.9").decode()})
            assert again.status_code == 404 and "does not hold it" in again.text, again.text

            # What a good hop carries is the client's own address: the owner audits that one, not the
            # address of the replica that passed the request on (here both are loopback, so the test
            # mints a hop naming another). Hugo's first request to this replica opens a session.
            hugo = await asyncio.to_thread(first.add_user, "hugo")
            opening = {"method": "POST", "path": "/mcp", "headers": []}
            opened = await http.post(second.mcp_url, json=INIT, headers={
                **LEGACY, "Authorization": f"Bearer {hugo}", HOP_HEADER.decode(): genuine.hop(opening, "203.0.113.9").decode()})
            assert opened.status_code == 200, opened.text

            def accepted() -> list[dict[str, Any]]:
                exported = first.cli("audit", "export", "--json").stdout.splitlines()
                return [e for e in map(json.loads, exported) if e["action"] == "auth.accepted" and e["actor"].endswith("/hugo")]

            deadline = time.monotonic() + 60
            while not (found := await asyncio.to_thread(accepted)):
                assert time.monotonic() < deadline, "hugo's request was not audited"
                await asyncio.sleep(0.5)
            assert [e["detail"]["ip"] for e in found] == ["203.0.113.9"], found


async def test_a_retry_answering_input_required_reaches_the_replica_holding_the_call(replicas, kube, workdir):
    """A 2026-07-28 call whose server asks for input is held by the replica that answered
    input_required; the Service sends the retry to the other one, which passes it on: it completes.
    Attacks: a state forged or sealed by a stranger, another user's state, a genuine state with a
    forged hop, none of which reaches the held call nor makes a replica connect elsewhere."""
    first, second = replicas
    async with asyncio.timeout(WITHIN):
        ines = await asyncio.to_thread(first.add_user, "ines")
        mallory = await asyncio.to_thread(first.add_user, "mallory-input")
        admin = await asyncio.to_thread(first.add_user, "ines-admin", "default", "admin")
        async with operator(kube, workdir, "ines", "mallory-input") as played, httpx.AsyncClient(timeout=180) as http:
            # The conformance fixture approved again (the first test revokes it), in case that one ran.
            path = f"/registry/v1/servers/{BUILTIN_NAMESPACE}/conformance/versions/{product_version()}/approve"
            approved = await http.post(first.base_url + path, json={}, headers={"Authorization": f"Bearer {admin}"})
            assert approved.status_code == 200, approved.text
            for held, other in ((first, second), (second, first)):
                state = await ask_name(http, held, ines)
                done = await answer_name(http, other, ines, state, "Ada")
                assert done["result"]["content"][0]["text"] == "Hello, Ada!", done  # the server read the answer
                # Good for one retry, wherever the second one lands.
                for replica in (first, second):
                    again = await answer_name(http, replica, ines, state, "Eve")
                    assert again["error"]["code"] == -32602, again
            assert played.started == 1  # one pod for ines, whichever replica held her calls

            # Attacks on a call held by the first replica, sent to the second.
            trapped: list[str] = []

            async def trap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                trapped.append(str(writer.get_extra_info("peername")))
                writer.close()

            server = await asyncio.start_server(trap, "127.0.0.1", 0)
            trap_address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            async with server:
                state = await ask_name(http, first, ines)
                # Sealed with another secret, naming the trap as the holder: never followed.
                stranger_secret = b"not the fleet's secret, but long enough 0123"
                stranger = AESGCMRequestStateCodec([hmac.new(stranger_secret, b"mcpfleet/request-state", hashlib.sha256).hexdigest()])
                async with await psycopg.AsyncConnection.connect(first.database_url) as conn:
                    row = await (await conn.execute("SELECT id FROM users WHERE name = 'ines'")).fetchone()
                    assert row is not None
                    user_id = row[0]
                trap_route = base64.urlsafe_b64encode(trap_address.encode()).rstrip(b"=").decode()
                claims = {"v": 1, "iat": time.time(), "exp": time.time() + 300, "m": "tools/call", "s": f"x~{user_id}~{trap_route}.1"}
                forged = [stranger.seal(json.dumps(claims).encode()), state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB"),
                          state + "x", "not-a-state"]
                # Well made but for the key: a replica with the stranger's secret would follow it.
                assert HeldCallRoutes(stranger_secret, 300).route_of(
                    {"method": "tools/call", "params": {"requestState": forged[0]}}, user_id) == trap_address
                for bad in forged:
                    refused = await answer_name(http, second, ines, bad, "Mallory")
                    assert refused["error"]["code"] == -32602 and "requestState" in refused["error"]["message"], refused
                # Mallory with ines's genuine state, on either replica: refused, her answer reaches nobody.
                for replica in (second, first):
                    stolen = await answer_name(http, replica, mallory, state, "Mallory")
                    assert stolen["error"]["code"] == -32602, stolen
                    assert "Ada" not in str(stolen) and "Mallory" not in str(stolen)
                # A hop header of the client's own making with the genuine state: refused before anything reads it.
                scope = {"method": "POST", "path": "/mcp", "headers": []}
                hop = SessionSeal(b"not-the-fleet-key-0123456789", "x:1").hop(scope, "203.0.113.9")
                refused_hop = await http.post(second.mcp_url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/call"},
                                              headers={"Authorization": f"Bearer {ines}", HOP_HEADER.decode(): hop.decode()})
                assert refused_hop.status_code == 403, refused_hop.text
                assert trapped == [], "a replica connected to an address a client wrote"
                # The held call waited on, untouched: ines's own retry, through the other replica, completes it.
                done = await answer_name(http, second, ines, state, "Ada")
                assert done["result"]["content"][0]["text"] == "Hello, Ada!", done


async def task_status(http: httpx.AsyncClient, replica: Fleet, key: str, task_id: str, until: set[str]) -> dict[str, Any]:
    """tasks/get on `replica` until the task is in one of `until` (any replica answers: the row is in PostgreSQL)."""
    while True:
        answer = await stateless(http, replica, key, {"taskId": task_id}, "tasks/get")
        if answer["result"]["status"] in until:
            return answer["result"]
        assert answer["result"]["status"] in ("working", "input_required"), answer
        await asyncio.sleep(0.3)


async def test_a_tasks_answers_reach_the_replica_running_it(replicas, kube, workdir):
    """A task whose server asks for input runs on the replica that created it; tasks/update sent to the
    other is passed on there (the runner's address is kept with the task), and the task completes.
    Attack: another user's tasks/update with its id, through either replica, reaches nothing."""
    first, second = replicas
    async with asyncio.timeout(WITHIN):
        uma = await asyncio.to_thread(first.add_user, "uma")
        mallory = await asyncio.to_thread(first.add_user, "mallory-tasks")
        admin = await asyncio.to_thread(first.add_user, "uma-admin", "default", "admin")
        async with operator(kube, workdir, "uma") as played, httpx.AsyncClient(timeout=180) as http:
            path = f"/registry/v1/servers/{BUILTIN_NAMESPACE}/conformance/versions/{product_version()}/approve"
            approved = await http.post(first.base_url + path, json={}, headers={"Authorization": f"Bearer {admin}"})
            assert approved.status_code == 200, approved.text
            for runner, other in ((first, second), (second, first)):
                created = await stateless(http, runner, uma, {"name": "conformance__confirm_delete",
                                                              "arguments": {"filename": "a.txt"}})
                assert created["result"]["resultType"] == "task", created
                task_id = created["result"]["taskId"]
                task = await task_status(http, other, uma, task_id, {"input_required"})
                (key,) = task["inputRequests"]
                forged = {key: {"action": "accept", "content": {"confirm": False}}}
                for replica in (other, runner):
                    refused = await stateless(http, replica, mallory, {"taskId": task_id, "inputResponses": forged},
                                              "tasks/update")
                    assert refused["error"]["code"] == -32602, refused
                mine = {key: {"action": "accept", "content": {"confirm": True}}}
                updated = await stateless(http, other, uma, {"taskId": task_id, "inputResponses": mine}, "tasks/update")
                assert updated["result"]["resultType"] == "complete", updated
                done = await task_status(http, other, uma, task_id, {"completed", "failed", "cancelled"})
                assert done["status"] == "completed" and done["result"]["content"][0]["text"] == "a.txt: confirm=True", done
            assert played.started == 1


async def test_the_owner_gone_its_sessions_answer_404_and_a_new_one_works(replicas, kube, workdir):
    """Runs last: it kills the second replica. What its death costs is its sessions (404, so the client
    opens a new one); the user's pod, and what is in its workspace, stay."""
    first, second = replicas
    async with asyncio.timeout(WITHIN):
        tara = await asyncio.to_thread(first.add_user, "tara")
        async with operator(kube, workdir, "tara") as played, httpx.AsyncClient(timeout=60) as http:
            session = Session(http, tara)
            await session.open(second)
            await session.call(first, "workspace__write_file", path="kept.txt", content="outlives a replica")
            held = await ask_name(http, second, tara)  # a 2026-07-28 call the second replica holds
            created = await stateless(http, second, tara, {"name": "conformance__confirm_delete", "arguments": {"filename": "b"}})
            task_id = created["result"]["taskId"]  # and a task it runs, waiting for input
            (key,) = (await task_status(http, first, tara, task_id, {"input_required"}))["inputRequests"]
            await asyncio.to_thread(second.stop, signal.SIGKILL)
            # Their answers through the first: the "no longer awaited" error, not a hang.
            late = await answer_name(http, first, tara, held, "Ada")
            assert late["error"]["code"] == -32602 and "no longer awaited" in late["error"]["message"], late
            update = {"taskId": task_id, "inputResponses": {key: {"action": "accept", "content": {"confirm": True}}}}
            late = await stateless(http, first, tara, update, "tasks/update")
            assert late["error"]["code"] == -32602 and "no longer awaited" in late["error"]["message"], late
            gone = await session.post(first, {"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
            assert gone.status_code == 404, gone.text
            assert "replica that held it is gone" in gone.json()["error"]["message"], gone.text
            fresh = Session(http, tara)
            await fresh.open(first)
            assert "outlives a replica" in await fresh.call(first, "workspace__read_file", path="kept.txt")
            assert played.started == 1
