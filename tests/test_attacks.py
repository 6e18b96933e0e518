"""Attacks on a running gateway that the other modules leave out; README "What the tests attack" maps
the rest. Each test plays the attacker against a real `mcpfleet up`, real runsc sandboxes."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
import pytest

from tests.clients import connect, structured, text_of

MODERN = {"MCP-Protocol-Version": "2026-07-28", "Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
LEGACY = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}
SECRET = "victim-secret-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def keys(fleet) -> dict[str, str]:
    """A victim with a secret in their workspace, an attacker, and the registry roles (names unique to
    this module: the fleet is shared with other modules)."""
    tag = secrets.token_hex(3)
    return {role: fleet.add_user(f"atk-{role}-{tag}", role="member" if role in ("victim", "mallory") else role)
            for role in ("victim", "mallory", "publisher", "member")}


@pytest.fixture(scope="module")
async def planted(fleet, keys) -> None:
    async with connect(fleet.mcp_url, keys["victim"]) as client:
        written = await client.call_tool("workspace__write_file", {"path": "secret.txt", "content": SECRET})
    assert not written.is_error, text_of(written)


def modern(fleet, tool: str, arguments: dict, key: str, **extra_headers: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments, "_meta": META}}
    return httpx.post(fleet.mcp_url, json=body, timeout=60, headers={
        **MODERN, "Mcp-Method": "tools/call", "Mcp-Name": tool, "Authorization": f"Bearer {key}", **extra_headers})


def still_serving(fleet, key: str) -> None:
    response = modern(fleet, "workspace__list_dir", {"path": "."}, key)
    assert response.status_code == 200 and "result" in response.json(), response.text


async def sh(fleet, key: str, command: str) -> dict:
    async with connect(fleet.mcp_url, key) as client:
        return structured(await client.call_tool("exec__run", {"command": command, "timeout_s": 30}))


# -- the HTTP edge ------------------------------------------------------------------------------


def test_a_foreign_origin_and_a_rebound_host_are_refused(fleet, keys):
    mallory = keys["mallory"]
    assert modern(fleet, "workspace__list_dir", {}, mallory, Origin="https://evil.example").status_code == 403
    assert modern(fleet, "workspace__list_dir", {}, mallory, Origin=f"http://127.0.0.1.evil.example:{fleet.port}").status_code == 403
    # DNS rebinding: evil.example now resolves to 127.0.0.1, so the browser sends its own Host.
    rebound = modern(fleet, "workspace__list_dir", {}, mallory, Host=f"evil.example:{fleet.port}")
    assert rebound.status_code in (403, 421), rebound.status_code
    assert "result" not in rebound.text
    still_serving(fleet, mallory)


async def test_another_users_session_id_is_answered_as_if_it_did_not_exist(fleet, keys, planted):
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    opened = httpx.post(fleet.mcp_url, json=init, headers={**LEGACY, "Authorization": f"Bearer {keys['victim']}"})
    sid = opened.headers["mcp-session-id"]
    read = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "workspace__read_file", "arguments": {"path": "secret.txt"}}}

    def as_mallory(session_id: str) -> httpx.Response:
        return httpx.post(fleet.mcp_url, json=read, timeout=60, headers={
            **LEGACY, "Authorization": f"Bearer {keys['mallory']}", "Mcp-Session-Id": session_id,
            "MCP-Protocol-Version": "2025-11-25"})

    stolen, made_up = as_mallory(sid), as_mallory(secrets.token_hex(16))
    assert stolen.status_code == made_up.status_code == 404
    assert stolen.text == made_up.text and SECRET not in stolen.text

    # The stateless revision: the stolen header is ignored, the caller is who the key says.
    forged = modern(fleet, "workspace__read_file", {"path": "secret.txt"}, keys["mallory"], **{"Mcp-Session-Id": sid})
    assert SECRET not in forged.text
    assert forged.status_code == 404 or forged.json()["result"]["isError"], forged.text


# -- malformed and oversized bodies -----------------------------------------------------------


@pytest.mark.parametrize("body, code", [
    (b"not json at all", -32700),
    (b"42", -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "params": {}}', -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list", "params": {}}', -32600),
    (json.dumps({"jsonrpc": "2.0", "id": 10**400, "method": "tools/list", "params": {}}).encode(), None),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, None),
], ids=["not-json", "not-an-object", "no-method", "jsonrpc-1.0", "huge-id", "nested-5000-deep"])
def test_malformed_json_rpc_gets_a_clear_error_and_the_gateway_keeps_serving(fleet, keys, body, code):
    headers = {**MODERN, "Mcp-Method": "tools/list", "Authorization": f"Bearer {keys['mallory']}"}
    response = httpx.post(fleet.mcp_url, content=body, headers=headers, timeout=30)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    still_serving(fleet, keys["mallory"])


def test_a_chunked_body_over_the_limit_is_413(fleet, keys):
    def chunks():
        for _ in range(5):
            yield b"x" * (1024 * 1024)

    headers = {**MODERN, "Mcp-Method": "tools/list", "Authorization": f"Bearer {keys['mallory']}"}
    response = httpx.post(fleet.mcp_url, content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413
    still_serving(fleet, keys["mallory"])


# -- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool, arguments", [
    ("workspace__read_file", {"path": "/proc/self/root/etc/passwd"}),
    ("workspace__read_file", {"path": "/proc/1/root/etc/passwd"}),
    ("workspace__list_dir", {"path": "../"}),
    ("workspace__list_dir", {"path": "/"}),
    ("workspace__write_file", {"path": "../planted.txt", "content": "x"}),
    ("workspace__write_file", {"path": "/tmp/planted.txt", "content": "x"}),
    ("workspace__delete", {"path": "../"}),
    ("workspace__delete", {"path": "/workspace/../etc/hostname"}),
])
async def test_every_path_tool_refuses_to_leave_the_workspace(fleet, keys, tool, arguments):
    async with connect(fleet.mcp_url, keys["mallory"]) as client:
        result = await client.call_tool(tool, arguments)
    assert result.is_error, text_of(result)
    assert "root:" not in text_of(result) and "etc" not in json.dumps(result.structured_content or {})


async def test_symlinks_planted_from_a_shell_lead_nowhere(fleet, keys, planted):
    out = await sh(fleet, keys["mallory"], "cd /workspace && ln -sfn /proc/self/root root-link && ln -sfn / slash "
                   "&& ln -sfn /tmp tmp-link && echo linked")
    assert "linked" in out["stdout"], out
    async with connect(fleet.mcp_url, keys["mallory"]) as client:
        for tool, arguments in (("workspace__read_file", {"path": "root-link/etc/passwd"}),
                                ("workspace__list_dir", {"path": "slash"}),
                                ("workspace__list_dir", {"path": "root-link"}),
                                ("workspace__write_file", {"path": "tmp-link/planted.txt", "content": "x"}),
                                ("workspace__delete", {"path": "slash/etc"})):
            result = await client.call_tool(tool, arguments)
            assert result.is_error, (tool, arguments, text_of(result))
            assert "root:" not in text_of(result)
    assert "planted" not in (await sh(fleet, keys["mallory"], "ls /tmp"))["stdout"]


# -- from inside the sandbox -------------------------------------------------------------------


async def test_a_shell_sees_no_other_workspace_and_no_host_process(fleet, keys, planted):
    out = await sh(fleet, keys["mallory"], "ls -a / /workspace; echo ---; ls /proc | grep -c '^[0-9]'; "
                   "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    assert out["exit_code"] == 0, out
    listing, _, processes = out["stdout"].partition("---")
    assert "secret.txt" not in listing and SECRET not in out["stdout"]
    count, _, cmdlines = processes.strip().partition("\n")
    assert int(count) < 30, processes  # the supervisor, its servers and this shell, not the host's hundreds
    for host_only in ("-m cli", "postgres", "runsc", "pytest"):
        assert host_only not in cmdlines, (host_only, cmdlines)


async def test_the_sandbox_cannot_read_the_gateways_files(fleet, keys):
    paths = ["/work/main/pyproject.toml", "/work/main", str(fleet.home / "gateway.log"), str(fleet.home)]
    command = "; ".join(f"(cat {p} || ls {p}) >/dev/null 2>&1 && echo READ {p} || echo REFUSED {p}" for p in paths)
    out = await sh(fleet, keys["mallory"], command)
    assert "READ" not in out["stdout"].replace("REFUSED", ""), out
    assert out["stdout"].count("REFUSED") == len(paths), out

    # The sandbox's image has a /root of its own. The one thing of the host's that may show there is the
    # interpreter's installation, bound read-only at its own path by design (sandbox/runtime.py): when it
    # lives under /root (pyenv), its parents appear as empty mount points, and nothing beside them.
    assert len(list(Path("/root").iterdir())) > 1, "the host's /root is nearly empty: the check would prove little"
    inside = await sh(fleet, keys["mallory"], "python3 -c 'import sys; print(sys.base_prefix)'; echo ---; "
                      "find /root -maxdepth 4; touch /root/.pyenv/x 2>/dev/null && echo WROTE")
    prefix_line, _, found = inside["stdout"].partition("---")
    prefix = Path(prefix_line.strip())
    allowed = {prefix, *prefix.parents}
    for entry in found.split():
        path = Path(entry)
        assert path in allowed or path.is_relative_to(prefix), (entry, inside)
    assert "WROTE" not in inside["stdout"]


# -- the registry API by role --------------------------------------------------------------------


@pytest.mark.parametrize("role, method, path", [
    ("publisher", "POST", "/registry/v1/servers/io.example/weather/versions/1.0.0/approve"),
    ("publisher", "POST", "/registry/v1/servers/io.example/weather/versions/1.0.0/revoke"),
    ("publisher", "POST", "/registry/v1/drift/1/accept"),
    ("member", "POST", "/registry/v1/publish"),
    ("member", "GET", "/registry/v1/servers"),
    ("member", "GET", "/registry/v1/servers/io.example/weather/versions/1.0.0"),
    ("member", "GET", "/registry/v1/usage"),
])
def test_a_role_cannot_step_outside_itself(fleet, keys, role, method, path):
    # The role is checked before anything is looked up, so no version needs to exist for the refusal.
    response = httpx.request(method, fleet.base_url + path, headers={"Authorization": f"Bearer {keys[role]}"},
                             json={}, timeout=30)
    assert response.status_code == 403, response.text
    assert f"role {role!r} may not do this" in response.json()["error"]
