"""Rate limits and the concurrent-call limit, against running gateways; shared through a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.clients import connect, text_of
from tests.conftest import Fleet, free_port, make_fleet

RATE_LIMITED = -32029
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def post(fleet: Fleet, key: str, method: str = "ping", request_id: int = 1, **extra: object) -> httpx.Response:
    """One raw MCP POST: the limits apply before the transport looks at sessions, so no handshake is needed."""
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, **extra}
    headers = {**HEADERS, "Authorization": f"Bearer {key}"}
    return httpx.post(fleet.mcp_url, json=body, headers=headers, timeout=10)


def call_tool(fleet: Fleet, key: str, tool: str, request_id: int = 1) -> httpx.Response:
    return post(fleet, key, "tools/call", request_id, params={"name": tool, "arguments": {}})


def assert_refused(response: httpx.Response, request_id: int | None) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == request_id
    assert body["error"]["code"] == RATE_LIMITED
    assert f"retry after {response.headers['retry-after']} s" in body["error"]["message"]


def limit_audits(fleet: Fleet, actor: str) -> list[dict]:
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT detail FROM audit_entries WHERE action = 'limit.refused' AND actor = %s ORDER BY id", (actor,)
        ).fetchall()
    return [row[0] for row in rows]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Fleet]:
    running = make_fleet(
        tmp_path_factory,
        postgres_url,
        MCPFLEET_RATE_LIMIT_PER_MIN="30",
        MCPFLEET_TOOL_RATE_LIMIT_PER_MIN="3",
        MCPFLEET_MAX_CONCURRENT_CALLS="2",
    )
    running.start()
    yield running
    running.stop()


def test_burst_over_the_rate_limit_is_refused_while_another_user_keeps_working(limited: Fleet) -> None:
    flooder, bystander = limited.add_user("flooder"), limited.add_user("bystander")
    statuses = [post(limited, flooder, request_id=i).status_code for i in range(40)]
    refused = [i for i, status in enumerate(statuses) if status == 429]
    # 30 tokens, refilled at one every 2 s: a quick burst of 40 gets most of the last ten refused.
    assert 5 <= len(refused) <= 10, statuses
    assert 0 not in refused
    assert_refused(post(limited, flooder, request_id=99), 99)
    assert all(post(limited, bystander, request_id=i).status_code != 429 for i in range(10))

    # Every refusal is logged; the audit log gets one entry per 10 s, the rest counted later.
    assert "limit refused: user default/flooder, rate limit 30" in limited.log()
    deadline = time.monotonic() + 10
    while not limit_audits(limited, "default/flooder") and time.monotonic() < deadline:
        time.sleep(0.2)
    entries = limit_audits(limited, "default/flooder")
    assert entries == [{"limit": "rate", "value": 30, "suppressed": 0}]
    assert flooder not in limited.log()


def test_body_over_the_size_limit_still_gets_413(limited: Fleet) -> None:
    key = limited.add_user("large")
    headers = {**HEADERS, "Authorization": f"Bearer {key}"}
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"exec__run","arguments":{"x":"' + b"a" * (5 << 20) + b'"}}}'
    assert httpx.post(limited.mcp_url, content=body, headers=headers, timeout=30).status_code == 413


def test_per_tool_limit_counts_each_tool_apart(limited: Fleet) -> None:
    key = limited.add_user("tooluser")
    assert all(call_tool(limited, key, "exec__run", i).status_code != 429 for i in range(3))
    assert_refused(call_tool(limited, key, "exec__run", 4), 4)
    # At 2026-07-28 the tool's name comes from the Mcp-Name header.
    headers = {**HEADERS, "Authorization": f"Bearer {key}", "Mcp-Method": "tools/call", "Mcp-Name": "exec__run"}
    body = {"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {"name": "exec__run", "arguments": {}}}
    assert_refused(httpx.post(limited.mcp_url, json=body, headers=headers, timeout=10), "s")
    assert call_tool(limited, key, "workspace__list_dir", 5).status_code != 429
    assert post(limited, key, "tools/list", 6).status_code != 429


async def test_concurrent_calls_over_the_limit_are_refused(limited: Fleet) -> None:
    key = limited.add_user("busy")
    # The legacy client holds a GET stream open the whole time: it must not count as a call in flight.
    async with connect(limited.mcp_url, key) as client:
        assert "exit code 0" in text_of(await client.call_tool("exec__run", {"command": "true"}))  # cold start
        held = [asyncio.create_task(client.call_tool("exec__run", {"command": "sleep 3"})) for _ in range(2)]
        await asyncio.sleep(1)
        refused = await asyncio.to_thread(call_tool, limited, key, "exec__run", 7)
        assert_refused(refused, 7)
        assert refused.headers["retry-after"] == "1"
        assert "too many calls in flight (limit 2)" in refused.json()["error"]["message"]
        for result in await asyncio.gather(*held):
            assert "exit code 0" in text_of(result)
        # The slots are free again (another tool: exec__run has used up its own limit of 3).
        assert (await asyncio.to_thread(call_tool, limited, key, "workspace__list_dir", 8)).status_code != 429


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: run scripts/setup.sh test")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    process.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield process
    if process.poll() is None:
        process.terminate()
        process.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_server) -> Iterator[tuple[Fleet, Fleet]]:
    """Two gateways on one database, sharing their buckets through one redis-server."""
    first = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_RATE_LIMIT_PER_MIN="30", REDIS_URL=redis_server.url)
    port = free_port()
    second = Fleet(
        home=tmp_path_factory.mktemp("fleet"),
        database_url=first.database_url,
        port=port,
        env={**first.env, "MCPFLEET_PORT": str(port)},
    )
    second.env["MCPFLEET_HOME"] = str(second.home)
    first.start()
    second.start()
    yield first, second
    second.stop()
    first.stop()


def test_limit_holds_across_gateways_sharing_redis(pair: tuple[Fleet, Fleet]) -> None:
    first, second = pair
    key = first.add_user("shared")
    on_first = [post(first, key, request_id=i).status_code for i in range(20)]
    on_second = [post(second, key, request_id=i).status_code for i in range(20)]
    assert 429 not in on_first
    # 20 requests alone stay under 30 a minute: only a shared bucket refuses any on the second gateway.
    assert on_second.count(429) >= 5, on_second
    assert_refused(post(second, key, request_id=3), 3)


def test_redis_down_fails_open(pair: tuple[Fleet, Fleet], redis_server: subprocess.Popen) -> None:
    first, _ = pair
    key = first.add_user("unbounded")
    redis_server.terminate()
    redis_server.wait()
    statuses = [post(first, key, request_id=i).status_code for i in range(40)]
    assert 429 not in statuses, statuses
    assert "rate limits not enforced: Redis unavailable" in first.log()
