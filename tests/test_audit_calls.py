"""Tool calls and authentication decisions in the audit log: a real gateway, real sandboxes, real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from gateway.call_audit import REFUSED_EVERY_S, CallAudit, arguments_hash
from tests.clients import connect, text_of
from tests.conftest import ROOT, make_fleet

WEATHER = ROOT / "tests" / "tool_projects" / "weather"


@pytest.fixture(scope="module")
def audited(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def carol(audited) -> str:
    return audited.add_user("carol", tenant="acme")


def exported(fleet) -> list[dict]:
    return [json.loads(line) for line in fleet.cli("audit", "export", "--json").stdout.splitlines()]


def wait_for(fleet, match, timeout: float = 15) -> list[dict]:
    """Entries are written in batches about once a second: poll the export until `match` finds some."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in exported(fleet) if match(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


async def test_a_tool_call_is_audited_with_the_hash_of_its_arguments_and_its_latency(audited, carol):
    arguments = {"path": "audit-me.txt", "content": "not in the log"}
    async with connect(audited.mcp_url, carol) as client:
        written = await client.call_tool("workspace__write_file", arguments)
        assert not written.is_error, text_of(written)
    [entry] = wait_for(audited, lambda e: e["action"] == "tool.call" and e["target"] == "workspace__write_file")
    assert entry["tenant"] == "acme" and entry["actor"] == "acme/carol"
    assert entry["outcome"] == "ok"
    assert entry["detail"]["server"] == "workspace"
    assert entry["detail"]["args_sha256"] == arguments_hash(arguments)
    assert 0 < entry["detail"]["latency_ms"] < 60_000
    assert "not in the log" not in json.dumps(exported(audited))


async def test_failing_calls_are_audited_with_their_outcome(audited, carol):
    async with connect(audited.mcp_url, carol) as client:
        missing = await client.call_tool("workspace__read_file", {"path": "never-written.txt"})
        assert missing.is_error
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("nosuch__tool", {})
    [tool_error] = wait_for(audited, lambda e: e["action"] == "tool.call" and e["target"] == "workspace__read_file")
    assert tool_error["outcome"] == "tool error"
    [rpc_error] = wait_for(audited, lambda e: e["action"] == "tool.call" and e["target"] == "nosuch__tool")
    assert rpc_error["outcome"] == "jsonrpc error"
    assert rpc_error["detail"]["code"] == unknown.value.error.code


def test_a_refused_key_is_audited_by_prefix_and_ip_once_per_flood(audited):
    bad = "mcpf_" + "nosuchprefix" + "_" + "s" * 40
    for _ in range(5):
        refused = httpx.post(audited.mcp_url, headers={"Authorization": f"Bearer {bad}"}, json={})
        assert refused.status_code == 401
    found = wait_for(audited, lambda e: e["action"] == "auth.refused" and e["detail"].get("key_prefix") == "nosuchprefix")
    assert len(found) == 1, found  # the other four fall within the same 10 s
    assert found[0]["detail"]["reason"] == "unknown key"
    assert found[0]["detail"]["ip"] == "127.0.0.1"
    assert "s" * 40 not in json.dumps(exported(audited))


def test_a_revoked_key_is_refused_as_revoked(audited):
    key = audited.add_user("dave", tenant="acme")
    prefix = key.split("_")[1]
    audited.cli("keys", "revoke", prefix)
    assert httpx.post(audited.mcp_url, headers={"Authorization": f"Bearer {key}"}, json={}).status_code == 401
    [entry] = wait_for(audited, lambda e: e["action"] == "auth.refused" and e["detail"].get("key_prefix") == prefix)
    assert entry["detail"]["reason"] == "revoked key"


async def test_accepted_keys_are_audited_once_not_per_request(audited):
    key = audited.add_user("erin", tenant="acme")
    for _ in range(3):
        async with connect(audited.mcp_url, key) as client:
            await client.list_tools()
    found = wait_for(audited, lambda e: e["action"] == "auth.accepted" and e["actor"] == "acme/erin")
    time.sleep(1.5)  # a later batch would show up by now
    found = [e for e in exported(audited) if e["action"] == "auth.accepted" and e["actor"] == "acme/erin"]
    assert len(found) == 1
    assert found[0]["detail"]["key_prefix"] == key.split("_")[1]


def test_the_chain_still_verifies(audited, carol):
    assert wait_for(audited, lambda e: e["action"] in ("tool.call", "auth.refused"))
    done = audited.cli("audit", "verify")
    assert "audit log intact" in done.stdout


def test_refusals_of_a_flood_are_counted_into_the_next_entry():
    now = [0.0]
    calls = CallAudit(clock=lambda: now[0])
    for _ in range(7):
        calls.refused("unknown key", "10.0.0.1", key_prefix="abc")
    calls.refused("unknown key", "10.0.0.2")  # another IP is another stream
    now[0] = REFUSED_EVERY_S + 0.1
    calls.refused("unknown key", "10.0.0.1")
    details = [p.detail for p in calls._queue]
    assert [d["ip"] for d in details] == ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
    assert "suppressed" not in details[0]
    assert details[2]["suppressed"] == 6


# -- roles and tenants ----------------------------------------------------------------------


def registry_cli(fleet, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**fleet.env, "MCPFLEET_URL": fleet.base_url, "MCPFLEET_KEY": key}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def registry_api(fleet, key: str, method: str, path: str) -> httpx.Response:
    return httpx.request(method, fleet.base_url + path, headers={"Authorization": f"Bearer {key}"}, json={}, timeout=60)


async def test_roles_are_refused_clearly_and_audited_and_tenants_stay_apart(audited):
    keys = {(tenant, role): audited.add_user(f"{role}-{tenant}", tenant=tenant, role=role)
            for tenant in ("ta", "tb") for role in ("admin", "publisher", "member")}
    published = registry_cli(audited, keys["tb", "publisher"], "publish", str(WEATHER))
    assert published.returncode == 0, published.stdout + published.stderr
    version = "/registry/v1/servers/io.example/weather/versions/1.0.0"

    # A member of tenant B may not approve: a clear 403, and an audit entry saying why.
    refused = registry_api(audited, keys["tb", "member"], "POST", version + "/approve")
    assert refused.status_code == 403
    assert "role 'member' may not do this (needs admin)" in refused.json()["error"]
    [entry] = wait_for(audited, lambda e: e["action"] == "auth.refused" and e["actor"] == "tb/member-tb")
    assert entry["detail"]["reason"] == "insufficient role"
    assert entry["detail"]["needs"] == ["admin"] and entry["detail"]["request"].startswith("POST /registry/v1/")

    # Tenant A's admin neither sees nor approves tenant B's version.
    assert "io.example/weather" not in registry_api(audited, keys["ta", "admin"], "GET", "/registry/v1/servers").text
    assert registry_api(audited, keys["ta", "admin"], "GET", version).status_code == 404
    assert registry_api(audited, keys["ta", "admin"], "POST", version + "/approve").status_code == 404

    approved = registry_api(audited, keys["tb", "admin"], "POST", version + "/approve")
    assert approved.status_code == 200, approved.text
    # B's approval is B's: its members get the tools, A's do not, and A's readers do not see it.
    assert any(n.startswith("weather") for n in await tool_names(audited, keys["tb", "member"]))
    assert not any(n.startswith("weather") for n in await tool_names(audited, keys["ta", "member"]))
    for role in ("admin", "publisher"):
        listing = registry_api(audited, keys["ta", role], "GET", "/registry/v1/servers")
        assert listing.status_code == 200 and "weather" not in listing.text
    approvals = [e for e in exported(audited) if e["action"] == "registry.approve"]
    assert approvals and all(e["tenant"] == "tb" for e in approvals)


async def tool_names(fleet, key: str) -> set[str]:
    async with connect(fleet.mcp_url, key) as client:
        return {t.name for t in (await client.list_tools()).tools}


# -- the writer, against PostgreSQL ---------------------------------------------------------


async def test_a_batch_is_one_transaction_and_keeps_the_chain(postgres_url):
    from core import audit
    from core.accounts import Identity
    from core.db import open_pool
    from tests.conftest import fresh_database

    pool = await open_pool(fresh_database(postgres_url, "calls"))
    try:
        calls = CallAudit(pool=pool)
        who = Identity(user_id=1, user="alice", tenant="acme", role="member")
        arguments = {"path": "notes/today.txt", "content": "x" * 1000}
        n = 2000
        started = time.perf_counter()
        for _ in range(n):
            calls.tool_call(who, tool="workspace__write_file", server="workspace", arguments=arguments,
                            outcome="ok", latency_ms=3.2)
        queued = time.perf_counter() - started
        started = time.perf_counter()
        assert await calls.flush() == n
        flushed = time.perf_counter() - started
        print(f"\nper call on the call's path {queued / n * 1e6:.1f} us; written in the background "
              f"{flushed / n * 1e6:.0f} us per entry ({n} in one transaction)")
        assert await calls.flush() == 0
        async with pool.connection() as conn:
            assert await audit.verify(conn) is None
            head = await audit.head(conn)
        assert head is not None and head.last_id == n
    finally:
        await pool.close()
