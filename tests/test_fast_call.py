"""The gateway's fast path for `tools/call` (gateway/fast_call.py), against real gateways and sandboxes.

Two fleets: one with the fast path (the default) and one with `MCPFLEET_FAST_PATH=off`, whose answers
are the general path's. A 2026-07-28 call must be served by the fast path (its counter on /metrics
says so) and answer byte for byte as the general path does: results, tool errors, unknown tools,
malformed arguments. A call in a 2025-11-25 session too (gateway/fast_session_call.py): the same
events as the SDK's session transport sends, a cancel from its client (and from no one else), a
server request answered by the client. Around it nothing may change: rate limits, audit entries,
the rug-pull guard.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, text_of
from tests.conftest import Fleet, make_fleet
from tests.test_attacks_transport import headers as session_headers
from tests.test_attacks_transport import open_session
from tests.test_audit_calls import wait_for
from tests.test_registry import RUG_PULL, cli, project

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

REVISION = "2026-07-28"
SESSION_REVISION = "2025-11-25"
RATE_LIMITED = -32029
TOOL_LIMIT = 30  # tools/call per tool per minute, per user: only the rate-limit test calls workspace__delete


@pytest.fixture(scope="module")
def fast(tmp_path_factory, postgres_url) -> Iterator[Fleet]:
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_TOOL_RATE_LIMIT_PER_MIN=str(TOOL_LIMIT),
                         MCPFLEET_CONFORMANCE="on")
    running.start()
    running.keys = {role: running.add_user(f"{role}-1", role=role) for role in ("admin", "publisher", "member")}
    yield running
    running.stop()


@pytest.fixture(scope="module")
def general(tmp_path_factory, postgres_url) -> Iterator[Fleet]:
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_FAST_PATH="off",
                         MCPFLEET_TOOL_RATE_LIMIT_PER_MIN=str(TOOL_LIMIT), MCPFLEET_CONFORMANCE="on")
    running.start()
    running.keys = {"member": running.add_user("member-1")}
    yield running
    running.stop()


def call(fleet: Fleet, key: str, name: str, arguments: object, *, request_id: int | str = 7,
         headers: dict[str, str] | None = None, meta: dict | None = None) -> httpx.Response:
    """One stateless 2026-07-28 `tools/call`, as a client sends it."""
    meta = {"io.modelcontextprotocol/protocolVersion": REVISION, "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "0"}, **(meta or {})}
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta}}
    sent = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json", "MCP-Protocol-Version": REVISION, "Mcp-Method": "tools/call",
            "Mcp-Name": name, **(headers or {})}
    return httpx.post(fleet.mcp_url, json=body, headers=sent, timeout=120)


def served(fleet: Fleet) -> dict[tuple[str, str], float]:
    """`mcpfleet_tool_calls_by_path_total` by (path, revision), from /metrics (loopback may read it)."""
    page = httpx.get(f"{fleet.base_url}/metrics", timeout=10).text
    return {(m["path"], m["revision"]): float(m["n"]) for m in re.finditer(
        r'^mcpfleet_tool_calls_by_path_total\{path="(?P<path>\w+)",revision="(?P<revision>[^"]+)"\} (?P<n>\S+)$', page, re.M)}


def counted(before: dict, after: dict, path: str, revision: str = REVISION) -> float:
    return after.get((path, revision), 0.0) - before.get((path, revision), 0.0)


def same_answer(fast_reply: httpx.Response, general_reply: httpx.Response) -> None:
    assert fast_reply.status_code == general_reply.status_code, (fast_reply.text, general_reply.text)
    assert fast_reply.headers["content-type"] == general_reply.headers["content-type"]
    assert fast_reply.json() == general_reply.json()


def test_a_plain_call_takes_the_fast_path_and_answers_as_the_general_path(fast, general):
    for fleet in (fast, general):  # the same file in both users' workspaces
        assert call(fleet, fleet.keys["member"], "workspace__write_file", {"path": "a.txt", "content": "hi\n"}).status_code == 200
    before = served(fast), served(general)
    fast_reply = call(fast, fast.keys["member"], "workspace__read_file", {"path": "a.txt"})
    general_reply = call(general, general.keys["member"], "workspace__read_file", {"path": "a.txt"})
    after = served(fast), served(general)
    assert fast_reply.json()["result"]["content"][0]["text"] == "hi\n", fast_reply.text
    same_answer(fast_reply, general_reply)
    assert counted(before[0], after[0], "fast") == 1 and counted(before[0], after[0], "general") == 0
    assert counted(before[1], after[1], "general") == 1 and counted(before[1], after[1], "fast") == 0


async def test_the_sdk_clients_of_both_revisions_get_their_results(fast):
    before = served(fast)
    async with connect(fast.mcp_url, fast.keys["member"], mode=REVISION) as modern:
        assert text_of(await modern.call_tool("workspace__read_file", {"path": "a.txt"})) == "hi\n"
    async with connect(fast.mcp_url, fast.keys["member"], mode="legacy") as session:
        assert text_of(await session.call_tool("workspace__read_file", {"path": "a.txt"})) == "hi\n"
    after = served(fast)
    assert counted(before, after, "fast") == 1
    assert counted(before, after, "fast", SESSION_REVISION) == 1 and counted(before, after, "general", SESSION_REVISION) == 0


@pytest.mark.parametrize("name, arguments", [
    ("nosuch__tool", {}),  # unknown tool: a JSON-RPC error
    ("workspace__read_file", {"path": "missing.txt"}),  # the tool's own error: isError
    ("workspace__read_file", {"path": 3}),  # arguments the tool refuses (rewritten to one line)
    ("workspace__read_file", "not an object"),  # params the SDK refuses: INVALID_PARAMS
])
def test_errors_have_the_general_paths_shape(fast, general, name, arguments):
    before = served(fast)
    fast_reply = call(fast, fast.keys["member"], name, arguments)
    same_answer(fast_reply, call(general, general.keys["member"], name, arguments))
    assert counted(before, served(fast), "fast") == 1


def test_requests_the_transport_refuses_go_the_general_way_and_are_refused_alike(fast, general):
    cases = [
        {"Mcp-Name": "workspace__write_file"},  # the routing header disagrees with the body
        {"Accept": "application/json"},  # a stateless call must accept an event stream too
        {"Host": "evil.example:80"},  # DNS rebinding
    ]
    for headers in cases:
        before = served(fast)
        fast_reply = call(fast, fast.keys["member"], "workspace__read_file", {"path": "a.txt"}, headers=headers)
        general_reply = call(general, general.keys["member"], "workspace__read_file", {"path": "a.txt"}, headers=headers)
        assert fast_reply.status_code >= 400, (headers, fast_reply.text)
        assert fast_reply.status_code == general_reply.status_code and fast_reply.text == general_reply.text, headers
        after = served(fast)
        assert counted(before, after, "fast") == 0 and counted(before, after, "general") == 1, headers


def test_mcp_param_headers_are_checked_against_the_tools_schema_on_the_fast_path(fast, general):
    tool = "conformance__test_custom_headers"  # its `region` argument is mirrored in Mcp-Param-Region
    cases = [({"region": "eu"}, {"Mcp-Param-Region": "eu"}, 200), ({"region": "eu"}, {}, 400),
             ({"region": "eu"}, {"Mcp-Param-Region": "us"}, 400)]
    for arguments, headers, status in cases:
        before = served(fast)
        fast_reply = call(fast, fast.keys["member"], tool, arguments, headers=headers)
        assert fast_reply.status_code == status, (headers, fast_reply.text)
        same_answer(fast_reply, call(general, general.keys["member"], tool, arguments, headers=headers))
        assert counted(before, served(fast), "fast") == 1
    assert call(fast, fast.keys["member"], tool, {"region": "eu"}, headers={"Mcp-Param-Region": "eu"}).json()[
        "result"]["content"][0]["text"] == "Region: eu"


def events(reply: httpx.Response) -> list[dict]:
    return [json.loads(line.removeprefix("data:").strip()) for line in reply.text.splitlines() if line.startswith("data:")]


def test_notifications_of_a_fast_call_stream_before_its_result_as_on_the_general_path(fast, general):
    tool, opt_in = "conformance__test_logging_tool", {"io.modelcontextprotocol/logLevel": "info"}
    fast_reply = call(fast, fast.keys["member"], tool, {}, meta=opt_in)
    general_reply = call(general, general.keys["member"], tool, {}, meta=opt_in)
    assert fast_reply.headers["content-type"].startswith("text/event-stream"), fast_reply.text
    assert fast_reply.headers["content-type"] == general_reply.headers["content-type"]
    assert events(fast_reply) == events(general_reply)
    *logs, result = events(fast_reply)
    assert [n["params"]["data"] for n in logs] == [f"Log message {n} of 3" for n in (1, 2, 3)], logs
    assert result["id"] == 7 and "result" in result


def test_the_per_tool_rate_limit_holds_on_the_fast_path(fast):
    key = fast.add_user("limited")
    replies = []
    while len(replies) < 2 * TOOL_LIMIT and (not replies or replies[-1].status_code == 200):
        # The bucket refills at TOOL_LIMIT/60 a second while the calls go on: a few more than the limit get through.
        replies.append(call(fast, key, "workspace__delete", {"path": f"gone-{len(replies)}.txt"}, request_id=len(replies)))
    refused = replies[-1]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == RATE_LIMITED, [r.text for r in replies]
    assert "rate limit" in refused.json()["error"]["message"] and refused.json()["id"] == len(replies) - 1
    assert len(replies) > TOOL_LIMIT


def test_a_fast_call_is_audited(fast):
    key = fast.add_user("audited")
    assert call(fast, key, "workspace__write_file", {"path": "audit.txt", "content": "x"}).status_code == 200
    call(fast, key, "nosuch__audited", {})
    [ok] = wait_for(fast, lambda e: e["action"] == "tool.call" and e["actor"] == "default/audited"
                    and e["target"] == "workspace__write_file")
    assert ok["outcome"] == "ok" and ok["detail"]["server"] == "workspace", ok
    [refused] = wait_for(fast, lambda e: e["action"] == "tool.call" and e["target"] == "nosuch__audited")
    assert refused["outcome"] == "jsonrpc error" and refused["actor"] == "default/audited", refused


async def test_a_tool_whose_definition_drifted_is_withheld_on_the_fast_path(fast, tmp_path):
    member, admin = fast.keys["member"], fast.keys["admin"]
    root = project(tmp_path, "io.example/units", "1.0.0", RUG_PULL)
    assert "passed" in cli(fast, fast.keys["publisher"], "publish", str(root)).stdout  # clean in its trial run
    assert call(fast, member, "workspace__write_file", {"path": ".armed", "content": "yes"}).status_code == 200
    cli(fast, admin, "registry", "approve", "io.example/units", "1.0.0")
    deadline = time.monotonic() + 120
    while True:  # the approval reaches the running sandbox, whose server then lists its armed definition
        before = served(fast)
        reply = call(fast, member, "units__convert", {"celsius": 20})
        error = reply.json().get("error") or {}
        if "withheld" in error.get("message", "") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert error["code"] == -32602 and "units__convert is withheld: its definition differs" in error["message"], reply.text
    assert counted(before, served(fast), "fast") == 1
    async with connect(fast.mcp_url, member) as session:  # and the same on a 2025-11-25 session
        with pytest.raises(MCPError, match="units__convert is withheld: its definition differs"):
            await session.call_tool("units__convert", {"celsius": 20})


def in_session(fleet: Fleet, key: str, session: str, message: dict, **extra: str) -> httpx.Response:
    """One POST of a 2025-11-25 session, as a client sends it."""
    sent = session_headers(key, session, **{"MCP-Protocol-Version": SESSION_REVISION, **extra})
    return httpx.post(fleet.mcp_url, json=message, headers=sent, timeout=120)


def tool_call(name: str, arguments: object, request_id: int | str = 7) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize("name, arguments", [
    ("workspace__read_file", {"path": "s.txt"}),
    ("nosuch__tool", {}),
    ("workspace__read_file", {"path": "missing.txt"}),
    ("workspace__read_file", {"path": 3}),
    ("workspace__read_file", "not an object"),
])
def test_a_session_call_takes_the_fast_path_and_sends_what_the_sdks_session_path_sends(fast, general, name, arguments):
    replies = []
    for fleet in (fast, general):
        key = fleet.keys["member"]
        session = open_session(fleet, key).headers["mcp-session-id"]
        assert in_session(fleet, key, session, tool_call("workspace__write_file", {"path": "s.txt", "content": "s\n"})).status_code == 200
        before = served(fleet)
        reply = in_session(fleet, key, session, tool_call(name, arguments))
        assert counted(before, served(fleet), "fast" if fleet is fast else "general", SESSION_REVISION) == 1
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream"), reply.text
        assert reply.headers["mcp-session-id"] == session
        replies.append(events(reply))
    assert replies[0] == replies[1]
    assert replies[0][-1]["id"] == 7


async def test_a_session_call_is_cancelled_by_its_client_and_by_no_one_else(fast):
    key, intruder = fast.keys["member"], fast.add_user("canceller")
    session = open_session(fast, key).headers["mcp-session-id"]
    legacy = {"MCP-Protocol-Version": SESSION_REVISION}
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "slow", "reason": "enough"}}
    async with httpx.AsyncClient(timeout=60) as http:
        slow = http.build_request("POST", fast.mcp_url, headers=session_headers(key, session, **legacy),
                                  json=tool_call("exec__run", {"command": "sleep 40", "timeout_s": 60}, "slow"))
        started = time.monotonic()
        reply = await http.send(slow, stream=True)  # the fast path opens the event stream as the call starts
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        # Another user naming the session is refused as if it did not exist; the call goes on.
        assert (await http.post(fast.mcp_url, json=cancel, headers=session_headers(intruder, session, **legacy))).status_code == 404
        assert (await http.post(fast.mcp_url, json=cancel, headers=session_headers(key, session, **legacy))).status_code == 202
        body = (await reply.aread()).decode()
    assert time.monotonic() - started < 30, "the cancelled call ran on"
    assert "data:" not in body, body  # a cancelled request is never answered
    after = in_session(fast, key, session, tool_call("workspace__write_file", {"path": "after.txt", "content": "on\n"}))
    assert "result" in events(after)[-1], after.text  # and the session goes on


def test_a_session_busy_with_a_fast_call_does_not_idle_out_and_idles_out_after(tmp_path_factory, postgres_url):
    idle_s = 3
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_SESSION_IDLE_S=str(idle_s))
    running.start()
    try:
        key = running.add_user("idler")
        session = open_session(running, key).headers["mcp-session-id"]
        before = served(running)
        slow = in_session(running, key, session, tool_call("exec__run", {"command": f"sleep {idle_s + 2}", "timeout_s": 60}))
        assert "exit code 0" in events(slow)[-1]["result"]["content"][0]["text"], slow.text
        assert counted(before, served(running), "fast", SESSION_REVISION) == 1
        # The call outlasted the idle timeout: the session is still there.
        assert in_session(running, key, session, tool_call("workspace__list_dir", {"path": "."})).status_code == 200
        time.sleep(idle_s + 2)  # and once idle that long, it is gone as the SDK's sessions go
        gone = in_session(running, key, session, tool_call("workspace__list_dir", {"path": "."}))
        assert gone.status_code == 404, gone.text
    finally:
        running.stop()
