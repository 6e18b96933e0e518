"""Attacks on the audit log through what clients send, against a real gateway and PostgreSQL.

- A NUL in a token's claims or in a tool name (PostgreSQL text and jsonb take none) must not stop
  the auditing of everyone else, nor the gateway's shutdown; nor turn a registry URL, an issuer or
  an API key into a 500.
- Tool names and token claims of any size must add only a bounded entry to a log nobody can shrink.
- Tabs and newlines in a tool name must not forge lines or fields of `mcpfleet audit export`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time

import httpx
import psycopg
import pytest
from mcp.shared.exceptions import MCPError

from gateway.call_audit import CallAudit
from tests.clients import connect, text_of
from tests.conftest import make_fleet
from tests.test_admin_page import login_by_hand
from tests.test_audit_calls import exported, wait_for


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(gateway) -> dict[str, str]:
    return {name: gateway.add_user(name, tenant="acme", role=role)
            for name, role in (("mallory", "member"), ("bob", "member"), ("root", "admin"))}


def forged_jwt(claims: dict) -> str:
    """A JWT signed by no one: read only far enough to be refused."""
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{'A' * 43}"


def hashed_name(name: str) -> str:
    return "…sha256:" + hashlib.sha256(name.encode()).hexdigest()


# -- NUL --------------------------------------------------------------------------------------


async def test_a_nul_in_a_claim_or_a_tool_name_stops_no_one_being_audited(gateway, keys):
    for claims in ({"iss": "https://idp.example", "sub": "x\u0000"}, {"iss": "https://x\u0000", "sub": "y"}):
        refused = httpx.post(gateway.mcp_url, headers={"Authorization": f"Bearer {forged_jwt(claims)}"}, json={})
        assert refused.status_code == 401, refused.text
    async with connect(gateway.mcp_url, keys["mallory"]) as client:
        with pytest.raises(MCPError):
            await client.call_tool("x\u0000y", {})
    time.sleep(1.5)  # the bad entries are written (or tried) in a batch of their own before Bob calls

    async with connect(gateway.mcp_url, keys["bob"]) as client:
        listed = await client.call_tool("workspace__list_dir", {"path": "."})
        assert not listed.is_error, text_of(listed)
    [call] = wait_for(gateway, lambda e: e["action"] == "tool.call" and e["actor"] == "acme/bob")
    assert call["target"] == "workspace__list_dir" and call["outcome"] == "ok"

    entries = exported(gateway)
    [nul_call] = [e for e in entries if e["action"] == "tool.call" and e["actor"] == "acme/mallory"]
    assert nul_call["target"] == "x\ufffdy" + hashed_name("x\u0000y")  # cleaned, and told apart from "x\ufffdy"
    subs = [e["detail"].get("sub") for e in entries if e["action"] == "auth.refused"]
    assert "x\ufffd" + hashed_name("x\u0000") in subs
    assert "audit log intact" in gateway.cli("audit", "verify").stdout
    assert "could not write" not in gateway.log()


def test_a_nul_in_a_registry_url_an_issuer_or_a_key_is_refused_clearly(gateway, keys, monkeypatch, capsys):
    admin = {"Authorization": f"Bearer {keys['root']}"}
    for method, path in (("GET", "/registry/v1/servers/x%00y/z/versions/1.0.0"),
                         ("POST", "/registry/v1/servers/io.example/x%00/versions/1.0.0/approve"),
                         ("POST", "/registry/v1/servers/io.example/weather/versions/1%00/revoke")):
        answer = httpx.request(method, gateway.base_url + path, headers=admin, json={})
        assert answer.status_code == 400, (path, answer.status_code, answer.text)
        assert "NUL" in answer.json()["error"]
    approve = httpx.post(gateway.base_url + "/registry/v1/servers/io.example/weather/versions/1.0.0/approve",
                         headers=admin, json={"group": "g\u0000"})
    assert approve.status_code in (400, 404), approve.text

    # A key whose prefix holds a NUL on the admin page's login form (an HTTP header cannot carry one).
    assert login_by_hand(gateway, "mcpf_abcdefghij\u0000k_" + "s" * 40).status_code == 401
    assert httpx.get(gateway.base_url + "/admin/oidc/start?issuer=https://x%00").status_code < 500

    # `mcpfleet issuers add` (argv cannot carry a NUL; a program calling the command can).
    from cli import main as cli

    for name, value in gateway.env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["issuers", "add", "--tenant", "acme", "--issuer", "https://x\x00"]) == 1
    assert "control characters" in capsys.readouterr().err
    assert cli.main(["issuers", "remove", "https://x\x00"]) == 1
    assert cli.main(["users", "add", "x\x00", "--tenant", "acme"]) == 1
    assert httpx.get(gateway.base_url + "/readyz").status_code == 200


async def test_an_entry_the_database_refuses_is_recorded_as_refused_and_the_rest_are_written(postgres_url):
    from core import audit
    from core.db import open_pool
    from tests.conftest import fresh_database

    pool = await open_pool(fresh_database(postgres_url, "refused"))
    try:
        calls = CallAudit(pool=pool)
        calls.record("test.before", "ok", target="first")
        calls.record("test.unwritable", "ok", target="nan", detail={"latency_ms": math.nan})  # not JSON to jsonb
        calls.record("test.after", "ok", target="x\u0000\ud800", detail={"why\u0000": "\ud800" * 10})
        assert await calls.flush() == 3
        assert calls._queue == []
        async with pool.connection() as conn:
            written = [(e.action, e.target, e.detail) async for e in audit.entries(conn)]
            assert await audit.verify(conn) is None
            # Straight appends take the same values.
            await audit.append(conn, action="test.direct", outcome="ok", actor="\u0000" * 5000, detail={"k": ["\u0000"] * 500})
            assert await audit.verify(conn) is None
        assert [w[0] for w in written] == ["test.before", "audit.refused", "test.after"]
        assert written[1][1] == "nan" and written[1][2]["action"] == "test.unwritable"
        assert written[2][1].startswith("x\ufffd\ufffd…sha256:")
    finally:
        await pool.close()


# -- size ----------------------------------------------------------------------------------------


def audit_bytes(fleet) -> int:
    with psycopg.connect(fleet.database_url) as conn:
        return conn.execute("SELECT pg_total_relation_size('audit_entries')").fetchone()[0]


async def test_tool_names_and_claims_of_megabytes_add_a_bounded_entry(gateway, keys):
    names = [secrets.token_hex(3 * 1024 * 1024 // 2) for _ in range(2)]  # 3 MiB each, incompressible
    log_before, table_before = len(gateway.log()), audit_bytes(gateway)
    async with connect(gateway.mcp_url, keys["mallory"]) as client:
        for name in names:
            with pytest.raises(MCPError) as refused_call:
                await client.call_tool(name, {})
            assert len(str(refused_call.value)) < 1024  # the error names the tool bounded, not its megabytes
    huge_sub = "s" * 6000
    # From an address of its own: refusals are audited once per reason and client address per 10 s,
    # and the module's other tests were refused from 127.0.0.1 moments ago.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as http:
        refused = http.post(gateway.mcp_url, json={},
                            headers={"Authorization": f"Bearer {forged_jwt({'iss': 'https://big.example', 'sub': huge_sub})}"})
    assert refused.status_code == 401

    found = wait_for(gateway, lambda e: e["action"] == "tool.call" and e["target"].endswith(hashed_name(names[1])))
    [entry] = found
    assert entry["target"] == names[1][: len(entry["target"]) - len(hashed_name(names[1]))] + hashed_name(names[1])
    assert len(json.dumps(entry)) < 2048
    [claims] = wait_for(gateway, lambda e: e["action"] == "auth.refused" and e["detail"].get("issuer") == "https://big.example")
    assert claims["detail"]["sub"].endswith(hashed_name(huge_sub)) and len(json.dumps(claims)) < 4096
    assert audit_bytes(gateway) - table_before < 512 * 1024
    assert len(gateway.log()) - log_before < 64 * 1024
    assert "audit log intact" in gateway.cli("audit", "verify").stdout


# -- export --------------------------------------------------------------------------------------


async def test_tabs_and_newlines_in_a_tool_name_forge_no_export_line(gateway, keys):
    forged = "x\t-\tok\n999999\t2030-01-01T00:00:00.000000Z\tacme\tacme/root\tuser.add\tacme/mallory\tok\u2028\\"
    async with connect(gateway.mcp_url, keys["mallory"]) as client:
        with pytest.raises(MCPError):
            await client.call_tool(forged, {})
    [entry] = wait_for(gateway, lambda e: e["action"] == "tool.call" and e["target"] == forged)  # --json is exact

    lines = gateway.cli("audit", "export").stdout.splitlines()
    assert len(lines) == len(exported(gateway))
    assert not any(line.startswith("999999\t") for line in lines)
    [line] = [line for line in lines if line.startswith(f"{entry['id']}\t")]
    fields = line.split("\t")
    assert len(fields) == 7
    assert fields[5] == "x\\t-\\tok\\n999999\\t2030-01-01T00:00:00.000000Z\\tacme\\tacme/root\\tuser.add\\tacme/mallory\\tok\\u2028\\\\"


# -- shutdown ------------------------------------------------------------------------------------


async def test_the_gateway_stops_cleanly_and_writes_what_was_queued(gateway, keys):
    async with connect(gateway.mcp_url, keys["mallory"]) as client:
        with pytest.raises(MCPError):
            await client.call_tool("y\u0000z", {})
        with pytest.raises(MCPError):
            await client.call_tool("last__call_before_stopping", {})
    gateway.stop()
    log = gateway.log()
    assert "shutdown failed" not in log.lower() and "could not write" not in log, log[-3000:]
    assert any(e["target"] == "last__call_before_stopping" for e in exported(gateway))
    assert "audit log intact" in gateway.cli("audit", "verify").stdout
