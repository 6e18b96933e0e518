"""PostgreSQL stopped and restarted under a real gateway: running sandboxes go on serving calls.

The fleet here has an embedded PostgreSQL of its own (stopping the shared one would fail every other
test), stopped with `pg_ctl stop -m fast`, as a restart or a failover stops it, and started again on
the same socket. During the outage a session's calls go on (the key from cache, the sandbox already
running, the audit entries queued); what truly needs the database says so with a 503; once it is
back, every audit entry of the outage is in the log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.db import RestartableEmbedded, start_embedded
from gateway.call_audit import arguments_hash
from tests.clients import connect, text_of
from tests.conftest import make_fleet


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pg-outage")
    url = start_embedded(data_dir).replace("/mcpfleet?", "/postgres?")
    # Keys read again after 1 s, so the outage's calls take the cache's outage path, not its fresh one.
    fleet = make_fleet(tmp_path_factory, url, MCPFLEET_KEY_CACHE_S="1")
    fleet.start()
    server = RestartableEmbedded(data_dir)
    yield fleet, server
    if not server.running():  # a failure left it stopped
        server.start()
    fleet.stop()
    server.stop()  # the module's own server, not the suite's: it would outlive the run


def audited_calls(fleet) -> list[dict]:
    lines = fleet.cli("audit", "export", "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["action"] == "tool.call" and e["target"] == "workspace__write_file"]


def metric(fleet, name: str, **labels: str) -> float:
    text = httpx.get(f"{fleet.base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_calls_go_on_through_a_restart_and_every_audit_entry_arrives(outage):
    fleet, server = outage
    key = fleet.add_user("olga", tenant="acme")
    admin = fleet.add_user("root", tenant="acme", role="admin")
    stranger = fleet.add_user("nina", tenant="acme")  # never used before the outage: nothing cached
    sent: list[dict] = []

    async def write(client, n: int) -> None:
        arguments = {"path": f"outage-{n}.txt", "content": f"call {n}"}
        result = await client.call_tool("workspace__write_file", arguments)
        assert not result.is_error, text_of(result)
        sent.append(arguments)

    whoami = httpx.get(f"{fleet.base_url}/registry/v1/whoami", headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    assert whoami.status_code == 200, whoami.text  # the admin's key is cached: what follows needs the database itself
    async with connect(fleet.mcp_url, key) as client:
        for n in range(3):
            await write(client, n)
        retried_before = metric(fleet, "mcpfleet_audit_entries_total", fate="retried")

        server.stop()
        stopped = time.monotonic()
        try:
            for n in range(3, 13):  # the sandbox runs; the key comes from cache; the entries queue
                await write(client, n)
                time.sleep(0.5)
            read = await client.call_tool("workspace__read_file", {"path": "outage-7.txt"})
            assert text_of(read) == "call 7"
            # A second session of the same key opens and calls too.
            async with connect(fleet.mcp_url, key) as again:
                await write(again, 13)

            # What truly needs the database says so: a key never seen, and an admin's registry request.
            refused = httpx.post(fleet.mcp_url, headers={"Authorization": f"Bearer {stranger}"}, json={}, timeout=60)
            assert refused.status_code == 503, refused.text
            assert "needs the database" in refused.json()["error_description"]
            assert refused.headers["retry-after"]
            listing = httpx.get(f"{fleet.base_url}/registry/v1/servers", headers={"Authorization": f"Bearer {admin}"},
                                timeout=60)
            assert listing.status_code == 503, listing.text
            assert "database" in listing.json()["message"]

            assert metric(fleet, "mcpfleet_audit_queue_depth") >= 1
            ready = httpx.get(f"{fleet.base_url}/readyz", timeout=30)  # kept in service: it still serves
            assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
            assert metric(fleet, "mcpfleet_auth_served_in_outage_total") >= 1
        finally:
            print(f"outage: {time.monotonic() - stopped:.1f}s")
            server.start()
        restarted = time.monotonic()

        await write(client, 14)  # and after it, as before

    expected = {arguments_hash(a) for a in sent}
    assert len(expected) == 15
    deadline = time.monotonic() + 120  # the pool reconnects, then the writer's next round
    while True:
        found = {e["detail"]["args_sha256"] for e in audited_calls(fleet) if e["actor"] == "acme/olga"}
        if expected <= found or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert expected - found == set(), f"{len(expected - found)} audit entries lost:\n{fleet.log()[-3000:]}"
    print(f"every audit entry written {time.monotonic() - restarted:.1f}s after the restart")
    assert metric(fleet, "mcpfleet_audit_entries_total", fate="dropped") == 0
    assert metric(fleet, "mcpfleet_audit_entries_total", fate="retried") > retried_before
    assert fleet.cli("audit", "verify").returncode == 0
    # The key never seen during the outage works now that the database is back.
    assert httpx.post(fleet.mcp_url, headers={"Authorization": f"Bearer {stranger}"}, json={}, timeout=60).status_code != 503
