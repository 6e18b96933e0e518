"""Tool sets per client, end to end: real `mcpfleet up`, real PostgreSQL, real sandboxes, the SDK's Client.

A set (`mcpfleet toolsets set`) chosen with `/mcp?set=NAME` or bound to a key narrows tools/list, calls
and search; it never grants a tool the user may not use, and names are the user's own."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from gateway.tool_sets import CACHE_SECONDS
from tests.clients import MODES, connect, structured, text_of


@pytest.fixture(scope="module")
def alice(fleet) -> str:
    key = fleet.add_user("ts-alice")
    fleet.cli("toolsets", "set", "ts-alice", "files", "workspace__*", "exec__run,workspace__read_file")
    fleet.cli("toolsets", "set", "ts-alice", "runner", "exec__run")
    return key


async def tool_names(fleet, key: str, mode: str, query: str = "") -> list[str]:
    async with connect(fleet.mcp_url + query, key, mode) as client:
        return [t.name for t in (await client.list_tools()).tools]


def _mcp_error(exc: BaseException) -> MCPError | None:
    if isinstance(exc, MCPError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        if (found := _mcp_error(inner)) is not None:
            return found
    return None


async def refused_listing(fleet, key: str, mode: str, query: str = "", call: str | None = None) -> str:
    """The JSON-RPC error a client gets (at `initialize` for 2025-11-25, at tools/list or the `call`
    for 2026-07-28)."""
    try:
        async with connect(fleet.mcp_url + query, key, mode) as client:
            if call is None:
                await client.list_tools()
            else:
                await client.call_tool(call, {"command": "true"})
    except BaseException as exc:  # the SDK's client may wrap it in an exception group
        if (found := _mcp_error(exc)) is None:
            raise
        return str(found)
    raise AssertionError(f"listing with {query!r} was not refused")


def test_a_legacy_session_keeps_the_set_it_opened_with(fleet, alice):
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": f"Bearer {alice}"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    opened = httpx.post(fleet.mcp_url + "?set=runner", json=init, headers=headers, timeout=60)
    assert opened.status_code == 200, opened.text
    session = {**headers, "Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    httpx.post(fleet.mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
    # Later requests without (or with another) ?set= stay in the session's set.
    for url in (fleet.mcp_url, fleet.mcp_url + "?set=files"):
        listed = httpx.post(url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}, headers=session,
                            timeout=120)
        assert listed.status_code == 200, listed.text
        names = [tool["name"] for tool in _rpc_result(listed.text)["tools"]]
        assert names == ["exec__run", "fleet__search_tools"]
    # An unknown set fails the handshake itself.
    refused = httpx.post(fleet.mcp_url + "?set=nope", json=init, headers=headers, timeout=60)
    assert '"error"' in refused.text and "No tool set 'nope'" in refused.text, refused.text


def _rpc_result(body: str) -> dict:
    """The result of a JSON or one-event SSE response."""
    text = body.strip()
    if not text.startswith("{"):
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and line[5:].strip())
    return json.loads(text)["result"]


def test_toolsets_cli_lists_with_header_and_json(fleet, alice):
    table = fleet.cli("toolsets", "list", "ts-alice").stdout.splitlines()
    assert table[0].split() == ["SET", "KEYS", "UPDATED", "TOOLS"]
    assert [line.split()[0] for line in table[1:]] == ["files", "runner"]
    rows = json.loads(fleet.cli("toolsets", "list", "ts-alice", "--json").stdout)
    assert rows[0]["tools"] == ["workspace__*", "exec__run", "workspace__read_file"]
    refused = fleet.cli("toolsets", "set", "ts-alice", "Bad Name", "exec__run", check=False)
    assert refused.returncode != 0 and "tool set names" in refused.stderr
    refused = fleet.cli("keys", "create", "ts-alice", "--set", "nope", check=False)
    assert refused.returncode != 0 and "no tool set 'nope'" in refused.stderr


@pytest.mark.parametrize("mode", MODES)
async def test_set_in_the_query_narrows_list_and_calls(fleet, alice, mode):
    everything = await tool_names(fleet, alice, mode)
    assert "exec__run" in everything and "workspace__list_dir" in everything
    assert await tool_names(fleet, alice, mode, "?set=runner") == ["exec__run", "fleet__search_tools"]
    files = await tool_names(fleet, alice, mode, "?set=files")
    assert "exec__run" in files and "workspace__list_dir" in files
    async with connect(fleet.mcp_url + "?set=runner", alice, mode) as client:
        ran = await client.call_tool("exec__run", {"command": "echo hi", "timeout_s": 30})
        assert structured(ran)["stdout"].strip() == "hi"
        with pytest.raises(MCPError) as refused:
            await client.call_tool("workspace__list_dir", {})
        assert "not in tool set 'runner'" in str(refused.value)


@pytest.mark.parametrize("mode", MODES)
async def test_key_bound_to_a_set_sees_only_it_and_cannot_widen(fleet, alice, mode):
    key = fleet.cli("keys", "create", "ts-alice", "--set", "runner").stdout.strip().splitlines()[-1]
    assert await tool_names(fleet, key, mode) == ["exec__run", "fleet__search_tools"]
    assert await tool_names(fleet, key, mode, "?set=runner") == ["exec__run", "fleet__search_tools"]
    async with connect(fleet.mcp_url, key, mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("workspace__read_file", {"path": "x"})
        assert "not in tool set 'runner'" in str(refused.value)
    # the query may not switch (or drop) the key's set
    assert "bound to tool set 'runner'" in await refused_listing(fleet, key, mode, "?set=files")
    listed = json.loads(fleet.cli("toolsets", "list", "ts-alice", "--json").stdout)
    assert next(row["keys"] for row in listed if row["name"] == "runner") >= 1


@pytest.mark.parametrize("mode", MODES)
async def test_a_set_of_unapproved_tools_grants_nothing(fleet, alice, mode):
    # The conformance fixture is off for the default tenant: not the user's to use.
    fleet.cli("toolsets", "set", "ts-alice", "fixtures", "conformance__*", "conformance__test_simple_text", "nosuch__tool")
    assert await tool_names(fleet, alice, mode, "?set=fixtures") == ["fleet__search_tools"]
    async with connect(fleet.mcp_url + "?set=fixtures", alice, mode) as client:
        with pytest.raises(MCPError):
            await client.call_tool("conformance__test_simple_text", {})
        with pytest.raises(MCPError) as refused:
            await client.call_tool("exec__run", {"command": "true"})
        assert "not in tool set 'fixtures'" in str(refused.value)


@pytest.mark.parametrize("mode", MODES)
async def test_unknown_and_other_users_sets_are_clear_errors(fleet, alice, mode):
    bob_name = f"ts-bob-{mode}"
    bob = fleet.add_user(bob_name)
    unknown = await refused_listing(fleet, alice, mode, "?set=nope")
    assert "No tool set 'nope'" in unknown and "toolsets list" in unknown
    # alice's set name means nothing for bob
    assert f"No tool set 'runner' for default/{bob_name}" in await refused_listing(fleet, bob, mode, "?set=runner")
    assert "No tool set 'runner'" in await refused_listing(fleet, bob, mode, "?set=runner", call="exec__run")
    # bob's own set of the same name is his, not hers
    fleet.cli("toolsets", "set", bob_name, "runner", "workspace__list_dir")
    assert await tool_names(fleet, bob, mode, "?set=runner") == ["fleet__search_tools", "workspace__list_dir"]


async def test_removed_set_refuses_its_keys_and_search_stays_in_the_set(fleet, alice):
    fleet.cli("toolsets", "set", "ts-alice", "brief", "workspace__list_dir")
    key = fleet.cli("keys", "create", "ts-alice", "--set", "brief").stdout.strip().splitlines()[-1]
    async with connect(fleet.mcp_url, key) as client:
        found = await client.call_tool("fleet__search_tools", {"query": "run a shell command", "limit": 5})
        assert [hit["name"] for hit in structured(found)["tools"]] == ["workspace__list_dir"], text_of(found)
    fleet.cli("toolsets", "rm", "ts-alice", "brief")
    refused = fleet.cli("toolsets", "rm", "ts-alice", "brief", check=False)
    assert refused.returncode != 0 and "no tool set 'brief'" in refused.stderr
    # A key bound to a removed set is refused (after the gateway's short cache), never widened.
    await asyncio.sleep(CACHE_SECONDS + 0.5)
    assert "No tool set 'brief'" in await refused_listing(fleet, key, "legacy")
