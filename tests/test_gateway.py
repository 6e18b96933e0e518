"""The gateway end to end: real `mcpfleet up`, real PostgreSQL, real runsc sandboxes, the SDK's Client."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from sandbox.gvisor import choose
from tests.clients import MODES, connect, structured, text_of

MODERN = {"MCP-Protocol-Version": "2026-07-28", "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def alice(fleet) -> str:
    return fleet.add_user("alice")


@pytest.fixture(scope="module")
def bob(fleet) -> str:
    return fleet.add_user("bob")


async def call(fleet, key: str, tool: str, mode: str = "legacy", **arguments):
    async with connect(fleet.mcp_url, key, mode) as client:
        return await client.call_tool(tool, arguments)


async def sh(fleet, key: str, command: str) -> dict:
    return structured(await call(fleet, key, "exec__run", command=command, timeout_s=30))


def modern_call(tool: str, arguments: dict, request_id: int = 1) -> tuple[dict, dict]:
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": tool, "arguments": arguments,
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {},
                      "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}}
    return body, {**MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool}


# -- authentication --------------------------------------------------------------------------


def test_no_key_is_401_with_www_authenticate(fleet):
    body, headers = modern_call("workspace__list_dir", {})
    response = httpx.post(fleet.mcp_url, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_wrong_and_revoked_keys_are_401(fleet):
    key = fleet.add_user("carol")
    body, headers = modern_call("workspace__list_dir", {})
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for bad in (forged, "mcpf_000000000000_" + "x" * 43, "not-a-key", "Bearer"):
        response = httpx.post(fleet.mcp_url, json=body, headers={**headers, "Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, bad
    fleet.cli("keys", "revoke", key)
    response = httpx.post(fleet.mcp_url, json=body, headers={**headers, "Authorization": f"Bearer {key}"})
    assert response.status_code == 401


# -- tools, both protocol revisions -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_user_sees_namespaced_tools_deterministically(fleet, alice, mode):
    async with connect(fleet.mcp_url, alice, mode) as client:
        first = [t.name for t in (await client.list_tools()).tools]
        second = [t.name for t in (await client.list_tools()).tools]
    assert first == second == sorted(first)
    for name in ("workspace__read_file", "workspace__write_file", "workspace__list_dir", "workspace__delete", "exec__run"):
        assert name in first
    assert all("__" in name for name in first)


@pytest.mark.parametrize("mode", MODES)
async def test_write_then_read_in_own_workspace(fleet, alice, mode):
    async with connect(fleet.mcp_url, alice, mode) as client:
        written = await client.call_tool("workspace__write_file", {"path": f"notes-{mode}.txt", "content": "hello"})
        assert not written.is_error, text_of(written)
        read = await client.call_tool("workspace__read_file", {"path": f"notes-{mode}.txt"})
    assert not read.is_error
    assert "hello" in text_of(read)


def test_legacy_sessions_are_bound_to_their_identity(fleet, alice, bob):
    # Opened by alice: a raw initialize gives us a session id to try with bob's key.
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    opened = httpx.post(fleet.mcp_url, json=init, headers={**headers, "Authorization": f"Bearer {alice}"})
    assert opened.status_code == 200
    sid = opened.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    stolen = httpx.post(fleet.mcp_url, json=listing, headers={
        **headers, "Authorization": f"Bearer {bob}", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"})
    assert stolen.status_code == 404, stolen.text


# -- isolation between users ------------------------------------------------------------------


async def test_alices_file_is_invisible_to_bob_by_every_route(fleet, alice, bob):
    secret = "alice-secret-7f3a"
    written = await call(fleet, alice, "workspace__write_file", path="secret.txt", content=secret)
    assert not written.is_error
    assert secret in text_of(await call(fleet, alice, "workspace__read_file", path="secret.txt"))

    by_tool = await call(fleet, bob, "workspace__read_file", path="secret.txt")
    assert by_tool.is_error
    assert secret not in text_of(by_tool)
    listing = await call(fleet, bob, "workspace__list_dir", path=".")
    assert "secret.txt" not in text_of(listing)

    # -A, not -a: the servers' uids may not stat /workspace/.. (README, Known limits), which is no part of this.
    listing = await sh(fleet, bob, "ls -lA /workspace")
    assert listing["exit_code"] == 0, listing  # the listing itself works, so its silence means something
    assert "secret.txt" not in listing["stdout"]
    for command in ("cat /workspace/secret.txt", f"grep -r {secret} / 2>/dev/null | head -5",
                    "find / -name secret.txt 2>/dev/null"):
        out = await sh(fleet, bob, command)
        assert secret not in json.dumps(out), command
        assert "secret.txt" not in out["stdout"], command


@pytest.mark.parametrize("path", ["../secret.txt", "../../etc/passwd", "/etc/passwd", "a/../../x", "/workspace/../etc"])
async def test_traversal_is_refused(fleet, bob, path):
    result = await call(fleet, bob, "workspace__read_file", path=path)
    assert result.is_error
    assert "root:" not in text_of(result)


async def test_symlink_out_of_the_workspace_is_refused(fleet, bob):
    out = await sh(fleet, bob, "ln -sfn /etc /workspace/etc-link && ln -sf /etc/passwd /workspace/pw && echo linked")
    assert "linked" in out["stdout"]
    for path in ("etc-link/passwd", "pw"):
        result = await call(fleet, bob, "workspace__read_file", path=path)
        assert result.is_error, path
        assert "root:" not in text_of(result)


# -- the sandbox ------------------------------------------------------------------------------


async def test_exec_runs_under_gvisor(fleet, alice):
    out = await sh(fleet, alice, "uname -r; dmesg 2>/dev/null | head -3")
    kernel = out["stdout"].splitlines()[0].strip()
    assert kernel != os.uname().release
    assert out["exit_code"] == 0
    # gVisor reports the Linux version it emulates, and its boot log names it.
    assert kernel.startswith("4.4"), out


async def test_sandbox_has_no_network(fleet, alice):
    probe = (
        "python3 -c \"import socket,sys\n"
        f"for host, port in (('127.0.0.1', {fleet.port}), ('10.0.0.1', 80), ('1.1.1.1', 53)):\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((host, port)); print('CONNECTED', host)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', host, e)\n\""
    )
    out = await sh(fleet, alice, probe)
    assert "CONNECTED" not in out["stdout"], out
    assert out["stdout"].count("BLOCKED") == 3, out


# -- bad input --------------------------------------------------------------------------------


def test_malformed_json_rpc_gets_clear_errors(fleet, alice):
    auth = {"Authorization": f"Bearer {alice}"}
    headers = {**MODERN, **auth, "Mcp-Method": "tools/list"}
    broken = httpx.post(fleet.mcp_url, content=b'{"jsonrpc": "2.0", "id": 1, "method": ', headers=headers)
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == -32700

    legacy = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **auth}
    for body in (b"[]", b'"just a string"', b'{"jsonrpc": "2.0", "id": 1}', b"\xff\xfe"):
        response = httpx.post(fleet.mcp_url, content=body, headers=legacy)
        assert 400 <= response.status_code < 500, (body, response.status_code)
        assert "error" in response.json(), body


async def test_unknown_tool_is_a_clear_error(fleet, alice):
    for mode in MODES:
        async with connect(fleet.mcp_url, alice, mode) as client:
            for name in ("workspace__no_such_tool", "nosuchserver__read_file", "no-namespace"):
                try:
                    result = await client.call_tool(name, {})
                except MCPError as exc:
                    assert name in str(exc) and "Unknown tool" in str(exc)
                else:
                    assert result.is_error and "Unknown tool" in text_of(result), (mode, name)


def test_oversized_body_is_413_and_the_gateway_keeps_serving(fleet, alice):
    body, headers = modern_call("workspace__write_file", {"path": "big.txt", "content": "x" * (5 * 1024 * 1024)})
    response = httpx.post(fleet.mcp_url, json=body, headers={**headers, "Authorization": f"Bearer {alice}"}, timeout=30)
    assert response.status_code == 413
    body, headers = modern_call("workspace__list_dir", {"path": "."})
    again = httpx.post(fleet.mcp_url, json=body, headers={**headers, "Authorization": f"Bearer {alice}"}, timeout=60)
    assert again.status_code == 200, again.text
    assert "result" in again.json()


def test_health_probes(fleet):
    assert httpx.get(f"{fleet.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{fleet.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# -- a sandbox killed from outside ------------------------------------------------------------


def _sandboxes(fleet) -> list[dict]:
    return json.loads(fleet.cli("sandboxes", "list", "--json").stdout)


async def test_sandbox_killed_from_outside_is_replaced_on_the_next_call(fleet):
    key = fleet.add_user("dave")
    await sh(fleet, key, "echo warm > /tmp/in-memory-only")
    (before,) = [s for s in _sandboxes(fleet) if s["user"] == "dave"]
    assert before["state"] == "Running"
    # The runsc the fleet runs (the state of one runsc release is not for another's commands).
    subprocess.run([choose().runsc, "--root", str(fleet.home / "runsc"), "kill", before["id"], "KILL"], check=True)

    # The call that meets the dead sandbox may fail, clearly; the one after it gets a fresh sandbox.
    for _ in range(2):
        try:
            out = await sh(fleet, key, "cat /tmp/in-memory-only 2>&1; echo done")
            break
        except MCPError as exc:
            assert "sandbox" in str(exc).lower()
    else:
        pytest.fail("no fresh sandbox after the old one was killed")
    assert "done" in out["stdout"] and "warm" not in out["stdout"]
    (after,) = [s for s in _sandboxes(fleet) if s["user"] == "dave"]
    assert after["id"] != before["id"] and after["state"] == "Running"
