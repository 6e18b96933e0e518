"""The Ollama provider through the router, against a stand-in for an Ollama server (tests/ollama_standin.py):
no Ollama server runs here. What is tested is the translation both ways, and that the router counts,
audits and routes Ollama's asks as any other's."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.models import usage
from core.models.api import ChatAsk, ModelError
from core.models.factory import router_from_env
from core.models.ollama import OllamaProvider
from core.models.router import Router
from tests.models_fixtures import people
from tests.ollama_standin import DIMS, ollama_standin


@pytest.fixture(scope="module")
def standin():
    with ollama_standin() as served:
        yield served


async def test_chat_stream_and_embed_through_ollama(standin, db_pool):
    host, server = standin
    who = await people(db_pool)
    router = Router([OllamaProvider(host)], db_pool)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    ask = ChatAsk(messages=[{"role": "user", "content": "one two three four"}], model="llama3.2:1b",
                  max_tokens=3, temperature=0.5, json_schema=schema)
    try:
        answer = await router.chat(who.asks(who.alice), ask)
        assert (answer.content, answer.finish_reason, answer.tokens_in, answer.tokens_out) == ("one two three ", "length", 4, 3)
        sent = server.requests[-1]
        assert sent["format"] == schema and sent["options"] == {"num_predict": 3, "temperature": 0.5}

        deltas = [d async for d in router.chat_stream(who.asks(who.alice), ask)]
        assert [d.content for d in deltas[:-1]] == ["one ", "two ", "three "]
        assert deltas[-1].answer is not None and deltas[-1].answer.content == "one two three "

        embeddings = await router.embed(who.asks(who.bob, "search"), ["a", "bb"], "nomic-embed-text:latest")
        assert [len(v) for v in embeddings.vectors] == [DIMS, DIMS] and embeddings.tokens_in == 2

        rows = {(r["user"], r["model"]): r for r in await usage_of(db_pool, who.tenant)}
        assert rows[("alice", "llama3.2:1b")]["asks"] == 2 and rows[("alice", "llama3.2:1b")]["tokens_out"] == 6
        assert rows[("bob", "nomic-embed-text:latest")]["tokens_in"] == 2
    finally:
        await router.close()


async def test_ollama_models_listed_routed_and_unknown(standin, db_pool):
    host, server = standin
    who = await people(db_pool)
    router = router_from_env(db_pool, Path("/nonexistent"), {"OLLAMA_HOST": host, "MCPFLEET_MODEL": "ollama/llama3.2:1b"})
    try:
        assert [p.name for p in router.providers] == ["ollama"]  # a configured provider: no local model
        infos = await router.list_models()
        assert [(i.name, i.provider, i.state, i.default) for i in infos] == [
            ("llama3.2:1b", "ollama", "ready", True), ("nomic-embed-text:latest", "ollama", "ready", False)]
        answer = await router.chat(who.asks(who.alice), ChatAsk(messages=[{"role": "user", "content": "hi"}]))
        assert answer.model == "llama3.2:1b"
        # A name Ollama does not have: the router refuses it before asking, naming what there is.
        with pytest.raises(ModelError) as unknown:
            await router.chat(who.asks(who.alice), ChatAsk(messages=[{"role": "user", "content": "hi"}], model="mistral"))
        assert unknown.value.reason == "unknown_model" and "llama3.2:1b" in str(unknown.value)
    finally:
        await router.close()


async def test_ollama_down_is_a_provider_error(db_pool):
    who = await people(db_pool)
    router = Router([OllamaProvider("127.0.0.1:9")], db_pool, default_model="llama3.2:1b")
    try:
        with pytest.raises(ModelError) as failed:
            await router.chat(who.asks(who.alice), ChatAsk(messages=[{"role": "user", "content": "hi"}]))
        assert failed.value.reason == "provider"
    finally:
        await router.close()


async def usage_of(db_pool, tenant: str) -> list[dict]:
    async with db_pool.connection() as conn:
        return await usage.usage(conn, tenant=tenant)
