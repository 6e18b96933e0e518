"""The model endpoint's two ends and the translation between them, over real loopback sockets in
this process: the supervisor's `ModelEndpoint` (who asks, HTTP in and out), the channel's
`ModelRelay` and the gateway's `SandboxModels` (the Ollama and OpenAI APIs <-> the router's
shapes), called with the official `ollama` client and raw HTTP as a tool would.

`ScriptedModels` stands in for the model router (`core.models.api.Models`), whose answers a
unit test needs to know: it answers with fixed words and counts who asked. The end-to-end tests
with the real router, the real local model and a real runsc sandbox are in
tests/test_model_relay_sandbox.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ollama
import pytest

from core.models.api import Asker, ChatAnswer, ChatAsk, ChatDelta, Embeddings, ModelError, ModelInfo
from gateway.model_relay import SandboxModels
from sandbox.model_asks import ModelRelay
from sandbox.servers import ServerSpec
from sandbox.supervisor.models import ModelEndpoint

WORDS = ["one ", "two ", "three"]


class ScriptedModels:
    """Stands in for the router in these unit tests: `fail-<reason>` models raise that ModelError."""

    def __init__(self) -> None:
        self.asks: list[tuple[Asker, Any]] = []

    def _check(self, asker: Asker, ask: Any, model: str | None) -> str:
        self.asks.append((asker, ask))
        if model and model.startswith("fail-"):
            raise ModelError(model.removeprefix("fail-"), f"refused: {model}")
        return model or "tiny"

    async def chat(self, asker: Asker, ask: ChatAsk) -> ChatAnswer:
        model = self._check(asker, ask, ask.model)
        return ChatAnswer(model, "".join(WORDS), "stop", tokens_in=len(ask.messages), tokens_out=len(WORDS))

    async def chat_stream(self, asker: Asker, ask: ChatAsk) -> AsyncIterator[ChatDelta]:
        model = self._check(asker, ask, ask.model)
        for word in WORDS:
            yield ChatDelta(word)
            if ask.stop == ["break"]:
                raise ModelError("provider", "the provider broke off")
        yield ChatDelta("", ChatAnswer(model, "".join(WORDS), "length", len(ask.messages), len(WORDS)))

    async def embed(self, asker: Asker, texts: list[str], model: str | None = None) -> Embeddings:
        name = self._check(asker, texts, model)
        return Embeddings(name, [[float(len(t)), 0.5, -1.0] for t in texts], tokens_in=len(texts))

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo("tiny", "local", "ready", default=True), ModelInfo("big", "ollama", "starting")]


@dataclass
class FakeSandbox:
    """A sandbox as the gate reads it (`sandbox.tunnels.Sandbox`)."""

    servers: tuple[ServerSpec, ...]
    id: str = "sb-1"
    user_id: int | None = 7
    tenant: str | None = "acme"
    user: str | None = "alice"


GATEWAY = 1


class Loop:
    """The channel, both ways, in this process: each end's messages go straight to the other."""

    def __init__(self, gate: SandboxModels, sandbox: FakeSandbox, root: int):
        self.relay = ModelRelay(gate)
        self.relay.sandbox = sandbox
        self.sent: list[dict[str, Any]] = []
        # One gateway connection, with key GATEWAY (the supervisor may have several: `supervisor.link`).
        self.endpoint = ModelEndpoint(self._to_gateway, lambda server: root, lambda: GATEWAY)

    def _to_gateway(self, message: dict[str, Any], gateway: int) -> None:
        assert gateway == GATEWAY
        self.sent.append(message)
        self.relay.on_message(self, message)  # type: ignore[arg-type]

    def send(self, message: dict[str, Any]) -> None:
        self.endpoint.on_message(message, GATEWAY)


@pytest.fixture
async def endpoint():
    """The endpoint with `talker` (declaring inference) and `mute` (not), this process as their process."""
    models = ScriptedModels()
    sandbox = FakeSandbox((ServerSpec("talker", ("x",), inference=True), ServerSpec("mute", ("x",))))
    loop = Loop(SandboxModels(models), sandbox, os.getpid())
    _, env = loop.endpoint.credentials("talker", {})
    loop.endpoint.serve()
    yield loop, models, env
    loop.endpoint.close()


def post(url: str, body: dict[str, Any] | bytes, method: str = "POST") -> tuple[int, str, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


async def test_the_ollama_client_chats_generates_embeds_and_lists_through_the_endpoint(endpoint):
    loop, models, env = endpoint
    assert set(env) == {"OLLAMA_HOST", "OPENAI_BASE_URL", "OPENAI_API_KEY", "MCPFLEET_MODEL"}
    client = ollama.AsyncClient(host=env["OLLAMA_HOST"])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count"}]

    answer = await client.chat(model=env["MCPFLEET_MODEL"], messages=messages, options={"num_predict": 5, "temperature": 0})
    assert answer.message.content == "one two three" and answer.done and answer.eval_count == 3 and answer.prompt_eval_count == 2
    streamed = [part async for part in await client.chat(model="tiny", messages=messages, stream=True)]
    assert "".join(p.message.content for p in streamed) == "one two three"
    assert [p.done for p in streamed] == [False, False, False, True] and streamed[-1].done_reason == "length"
    generated = [part async for part in await client.generate(model="default", prompt="hi", system="sys", stream=True)]
    assert "".join(p.response for p in generated) == "one two three" and generated[-1].done

    embedded = await client.embed(model="default", input=["ab", "abcd"])
    assert embedded.embeddings == [[2.0, 0.5, -1.0], [4.0, 0.5, -1.0]]
    listed = await client.list()
    assert [m.model for m in listed.models] == ["tiny", "big"]

    # What the router was asked, and as whom: this sandbox's user, tenant and server, for a tool.
    asker, ask = models.asks[0]
    assert asker == Asker(7, "acme", "tool", server="talker")
    assert ask.model is None and ask.max_tokens == 5 and ask.temperature == 0.0 and ask.messages == messages
    assert models.asks[2][1].messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert models.asks[1][1].model == "tiny"


async def test_the_openai_api_answers_whole_and_streamed_as_sse(endpoint):
    loop, models, env = endpoint
    base = env["OPENAI_BASE_URL"]
    ask = {"model": "default", "messages": [{"role": "user", "content": [{"type": "text", "text": "count"}]}],
           "max_tokens": 9, "stop": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}}
    status, kind, body = await asyncio.to_thread(post, f"{base}/chat/completions", ask)
    completion = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert completion["object"] == "chat.completion" and completion["choices"][0]["message"] == {"role": "assistant", "content": "one two three"}
    assert completion["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    sent = models.asks[-1][1]
    assert sent.messages == [{"role": "user", "content": "count"}] and sent.stop == ["x"] and sent.json_schema == {"type": "array"}

    status, kind, body = await asyncio.to_thread(post, f"{base}/chat/completions", {**ask, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and kind == "text/event-stream"
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "one two three"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "role" not in chunks[1]["choices"][0]["delta"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3

    status, _, body = await asyncio.to_thread(post, f"{base}/embeddings", {"input": "abc", "model": "default", "encoding_format": "base64"})
    vector = json.loads(body)["data"][0]["embedding"]
    assert status == 200 and list(struct.unpack("<3f", base64.b64decode(vector))) == [3.0, 0.5, -1.0]
    status, _, body = await asyncio.to_thread(post, f"{base}/embeddings", {"input": ["a", "bb"]})
    assert [d["embedding"][0] for d in json.loads(body)["data"]] == [1.0, 2.0]
    status, _, body = await asyncio.to_thread(post, f"{base}/models", b"", "GET")
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny", "big"]


@pytest.mark.parametrize(("reason", "status"), [("not_ready", 503), ("over_quota", 429), ("unknown_model", 404),
                                                 ("invalid", 400), ("provider", 502)])
async def test_router_refusals_come_back_in_each_apis_error_shape_with_their_status(endpoint, reason, status):
    loop, models, env = endpoint
    model = f"fail-{reason}"
    with pytest.raises(ollama.ResponseError) as refused:
        await ollama.AsyncClient(host=env["OLLAMA_HOST"]).chat(model=model, messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == status and refused.value.error == f"refused: {model}"
    for stream in (False, True):
        got, kind, body = await asyncio.to_thread(post, f"{env['OPENAI_BASE_URL']}/chat/completions",
                                                  {"model": model, "stream": stream, "messages": [{"role": "user", "content": "x"}]})
        assert got == status and kind == "application/json"
        assert json.loads(body)["error"] == {"message": f"refused: {model}", "type": reason, "param": None, "code": reason}
    got, _, body = await asyncio.to_thread(post, f"{env['OLLAMA_HOST']}/api/embed", {"model": model, "input": "x"})
    assert got == status and json.loads(body) == {"error": f"refused: {model}"}


async def test_malformed_asks_and_unknown_paths_are_refused_in_shape(endpoint):
    loop, models, env = endpoint
    host, base = env["OLLAMA_HOST"], env["OPENAI_BASE_URL"]
    cases = [
        (f"{host}/api/chat", b"not json", "POST", 400),
        (f"{host}/api/chat", {"messages": [{"role": "wizard", "content": "x"}]}, "POST", 400),
        (f"{host}/api/chat", {"messages": []}, "POST", 400),
        (f"{host}/api/generate", {"prompt": 3}, "POST", 400),
        (f"{host}/api/pull", {"model": "x"}, "POST", 404),
        (f"{host}/api/chat", b"", "GET", 405),
        (f"{base}/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "POST", 400),
        (f"{base}/embeddings", {"input": [[1, 2]]}, "POST", 400),
        (f"{base}/completions", {"prompt": "x"}, "POST", 404),
    ]
    for url, body, method, status in cases:
        got, _, text = await asyncio.to_thread(post, url, body, method)
        error = json.loads(text)["error"]
        assert got == status, (url, body, got, text)
        assert isinstance(error, dict if "/v1/" in url else str), (url, error)
    assert models.asks == []  # none of them reached the router


async def test_a_stream_the_provider_breaks_off_ends_with_an_error_in_the_stream(endpoint):
    loop, models, env = endpoint
    status, _, body = await asyncio.to_thread(post, f"{env['OLLAMA_HOST']}/api/chat", {
        "messages": [{"role": "user", "content": "x"}], "options": {"stop": ["break"]}})
    lines = [json.loads(line) for line in body.splitlines()]
    assert status == 200 and lines[0]["message"]["content"] == "one " and lines[-1] == {"error": "the provider broke off"}
    status, _, body = await asyncio.to_thread(post, f"{env['OPENAI_BASE_URL']}/chat/completions", {
        "stream": True, "stop": ["break"], "messages": [{"role": "user", "content": "x"}]})
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e]
    assert json.loads(events[-2])["error"]["type"] == "provider" and events[-1] == "[DONE]"


async def test_only_a_server_declaring_inference_with_its_own_token_and_process_is_answered(endpoint):
    loop, models, env = endpoint
    port = loop.endpoint.port
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": False}
    # No token, a guessed one: refused by the supervisor, never sent to the gateway.
    for url in (f"http://127.0.0.1:{port}/api/chat", f"http://127.0.0.1:{port}/guessed/api/chat",
                f"http://127.0.0.1:{port}/guessed/v1/chat/completions"):
        status, _, body = await asyncio.to_thread(post, url, chat)
        assert status == 401 and "error" in json.loads(body)
    assert loop.sent == []

    # The token is right but the process is not the server's (nor below it): a neighbour that read it.
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stranger = Loop(loop.relay.gate, loop.relay.sandbox, neighbour.pid)  # type: ignore[arg-type]
        _, stolen = stranger.endpoint.credentials("talker", {})
        stranger.endpoint.serve()
        status, _, body = await asyncio.to_thread(post, f"{stolen['OLLAMA_HOST']}/api/chat", chat)
        assert status == 403 and f"process {os.getpid()} is not server 'talker'" in json.loads(body)["error"]
        assert stranger.sent == []
        stranger.endpoint.close()
    finally:
        neighbour.kill()
        neighbour.wait()

    # ... whereas a process this one starts is the server's own.
    code = f"import urllib.request; print(urllib.request.urlopen(urllib.request.Request({env['OLLAMA_HOST'] + '/api/tags'!r})).status)"
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate()
    assert out.strip() == b"200"

    # A supervisor taken over could ask for a server that declares no inference: the gateway refuses.
    mute = Loop(loop.relay.gate, loop.relay.sandbox, os.getpid())  # type: ignore[arg-type]
    _, mute_env = mute.endpoint.credentials("mute", {})
    mute.endpoint.serve()
    status, _, body = await asyncio.to_thread(post, f"{mute_env['OLLAMA_HOST']}/api/chat", chat)
    assert status == 403 and json.loads(body)["error"] == "server 'mute' does not declare inference in its manifest"
    mute.endpoint.close()
    # And a sandbox nobody holds (the warm pool's) asks nothing.
    loop.relay.sandbox = FakeSandbox(loop.relay.sandbox.servers, user_id=None)  # type: ignore[union-attr]
    status, _, _ = await asyncio.to_thread(post, f"{env['OLLAMA_HOST']}/api/chat", chat)
    assert status == 403
    assert all(asker.server == "talker" and asker.user_id == 7 for asker, _ in models.asks)


async def test_a_forgotten_token_opens_nothing_and_a_servers_own_openai_key_is_left_alone():
    endpoint = ModelEndpoint(lambda m: None, lambda s: os.getpid(), lambda: True)
    token, env = endpoint.credentials("talker", {"OPENAI_API_KEY": "the server's own"})
    assert "OPENAI_API_KEY" not in env and env["OLLAMA_HOST"].endswith(f"/{token}")
    endpoint.forget(token)
    endpoint.serve()
    try:
        status, _, _ = await asyncio.to_thread(post, f"{env['OLLAMA_HOST']}/api/tags", b"", "GET")
        assert status == 401
    finally:
        endpoint.close()


async def test_a_client_hanging_up_mid_stream_cancels_the_ask_at_the_gateway(endpoint):
    loop, models, env = endpoint
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(asker: Asker, ask: ChatAsk) -> AsyncIterator[ChatDelta]:
        yield ChatDelta("first ")
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield ChatDelta("never")

    models.chat_stream = slow  # type: ignore[method-assign]
    reader, writer = await asyncio.open_connection("127.0.0.1", loop.endpoint.port)
    body = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
    path = env["OLLAMA_HOST"].partition(str(loop.endpoint.port))[2]
    writer.write(f"POST {path}/api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head
    await asyncio.wait_for(started.wait(), 10)
    writer.close()
    await asyncio.wait_for(cancelled.wait(), 10)
    assert any(m["type"] == "model_cancel" for m in loop.sent)
    assert loop.endpoint.asks == {} and loop.relay._asks == {}


async def test_a_gateway_without_models_or_a_sandbox_nobody_holds_yet_refuses_every_ask():
    sent: list[dict[str, Any]] = []

    class Channel:
        def send(self, message: dict[str, Any]) -> None:
            sent.append(message)

    ask = {"type": "model_ask", "ask": 1, "server": "talker", "method": "GET", "path": "/api/tags", "body": ""}
    ModelRelay(None).on_message(Channel(), ask)  # type: ignore[arg-type]
    unheld = ModelRelay(SandboxModels(ScriptedModels()))  # its sandbox not set yet
    unheld.on_message(Channel(), {**ask, "ask": 2})  # type: ignore[arg-type]
    for _ in range(50):
        if len(sent) == 2:
            break
        await asyncio.sleep(0.01)
    assert [(m["ask"], m["status"], m["done"]) for m in sent] == [(1, 403, True), (2, 503, True)]
    assert all("error" in json.loads(m["data"]) for m in sent)
