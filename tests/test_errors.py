"""What a newcomer meets first, against a real gateway: only product tools (the conformance fixture
server is off unless a tenant enables it), and refusals a client shows in words saying what to change.
"""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from mcp_servers.workspace.server import MAX_WRITE_BYTES
from tests.clients import connect, text_of


@pytest.fixture(scope="module")
def alice(fleet) -> str:
    return fleet.add_user(f"alice-{secrets.token_hex(3)}")


def _mcp_errors(exc: BaseException) -> list[MCPError]:
    """The MCPErrors in what the SDK raised (it wraps them in exception groups)."""
    if isinstance(exc, MCPError):
        return [exc]
    return [e for inner in getattr(exc, "exceptions", ()) for e in _mcp_errors(inner)]


# -- fixtures are not product --------------------------------------------------------------------


async def test_the_conformance_fixture_server_is_off_unless_the_tenant_enables_it(fleet, alice):
    async with connect(fleet.mcp_url, alice) as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert "workspace__write_file" in names
    assert not [n for n in names if n.startswith("conformance__")], names

    tenant = f"conf-{secrets.token_hex(3)}"
    added = fleet.cli("tenants", "add", tenant, "--with-conformance")
    assert "conformance" in added.stdout
    key = fleet.add_user("tester", tenant=tenant)
    async with connect(fleet.mcp_url, key) as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert "conformance__test_simple_text" in names
    assert len([n for n in names if n.startswith("conformance__")]) >= 28

    listed = {t["tenant"]: t for t in json.loads(fleet.cli("tenants", "list", "--json").stdout)}
    assert listed[tenant]["conformance"] is True and listed["default"]["conformance"] is False
    table = fleet.cli("tenants", "list").stdout.splitlines()
    assert table[0].split() == ["TENANT", "USERS", "CONFORMANCE"]


# -- refusals a client shows ------------------------------------------------------------------


async def test_a_body_over_the_limit_is_a_jsonrpc_error_naming_the_setting(fleet, alice):
    async with connect(fleet.mcp_url, alice) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("workspace__write_file", {"path": "big.txt", "content": "x" * (5 * 2**20)})
        assert "MCPFLEET_MAX_BODY_BYTES" in str(caught.value)
        # The session goes on after the refusal.
        assert not (await client.call_tool("workspace__list_dir", {"path": "."})).is_error

    raw = httpx.post(fleet.mcp_url, content=b"{" + b" " * (5 * 2**20) + b"}", timeout=60,
                     headers={"Authorization": f"Bearer {alice}", "Content-Type": "application/json",
                              "Accept": "application/json, text/event-stream"})
    assert raw.status_code == 413 and raw.headers["content-type"].startswith("application/json")
    assert "MCPFLEET_MAX_BODY_BYTES" in raw.json()["error"]["message"]


async def test_what_write_file_advertises_fits_through_the_gateway(fleet, alice):
    async with connect(fleet.mcp_url, alice) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert f"at most {MAX_WRITE_BYTES // 2**20} MiB" in (tools["workspace__write_file"].description or "")
        written = await client.call_tool("workspace__write_file", {"path": "max.txt", "content": "a" * MAX_WRITE_BYTES})
        assert not written.is_error, text_of(written)
        over = await client.call_tool("workspace__write_file", {"path": "over.txt", "content": "a" * (MAX_WRITE_BYTES + 1)})
    assert over.is_error and f"at most {MAX_WRITE_BYTES} bytes" in text_of(over)


async def test_argument_errors_name_the_argument_in_one_line(fleet, alice):
    async with connect(fleet.mcp_url, alice) as client:
        missing = await client.call_tool("workspace__write_file", {"path": "x.txt"})
        wrong = await client.call_tool("workspace__read_file", {"path": 3})
    assert missing.is_error and text_of(missing) == "workspace__write_file: argument 'content' is missing"
    assert wrong.is_error and text_of(wrong) == "workspace__read_file: argument 'path' must be a valid string (got 3)"
    for said in (text_of(missing), text_of(wrong)):
        assert "\n" not in said and "pydantic" not in said


async def test_a_wrong_key_through_the_sdk_says_what_to_do(fleet, alice):
    wrong = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
    with pytest.raises(BaseException) as caught:
        async with connect(fleet.mcp_url, wrong) as client:
            await client.list_tools()
    [error] = _mcp_errors(caught.value)
    assert "API key or token was refused" in str(error) and "mcpfleet keys create" in str(error)

    raw = httpx.post(fleet.mcp_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert raw.status_code == 401 and raw.headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in raw.json()["error"]["message"]
