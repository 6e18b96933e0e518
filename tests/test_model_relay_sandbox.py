"""Models for tools, end to end: a real runsc sandbox (no network), a tool server declaring inference
that asks OLLAMA_HOST and OPENAI_BASE_URL from inside it (urllib: the sandbox's Python has no
`ollama` or `openai` package), the supervisor's endpoint, the channel, the gateway's
`SandboxModels`, the real router and the real local model (llama-server with Gemma 3 270M).

The model is a tiny base model: the tests assert structure (status, NDJSON lines and SSE events
that join to the answer, token counts, vectors of one size), never wording.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from core import audit
from core.models import usage
from core.models.router import Router
from gateway.model_relay import SandboxModels
from sandbox.bundle import TOOLS
from sandbox.manager import SandboxManager
from sandbox.servers import ServerSpec
from tests.models_fixtures import local_model  # noqa: F401  (a fixture)
from tests.test_egress import python_inside
from tests.test_sandbox_lifecycle import SERVERS, call, fleets, sh  # noqa: F401  (fleets is a fixture)
from tests.test_sandbox_supervisor import text

pytestmark = [pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
              pytest.mark.timeout(900)]

REVISION = "thinker-r1"
ENV_NAMES = ("OLLAMA_HOST", "OPENAI_BASE_URL", "OPENAI_API_KEY", "MCPFLEET_MODEL")

# The tool server declaring inference: any request to its model endpoint, from itself or a child.
THINKER = """
import json, os, subprocess, sys, urllib.error, urllib.request
from mcp.server.mcpserver import MCPServer
server = MCPServer("thinker")

def ask_now(base: str, path: str, body: str | None) -> str:
    url = os.environ[base] + path
    request = urllib.request.Request(url, data=body.encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.dumps({"status": response.status, "type": response.headers.get("Content-Type"), "body": response.read().decode()})
    except urllib.error.HTTPError as exc:
        return json.dumps({"status": exc.code, "type": exc.headers.get("Content-Type"), "body": exc.read().decode()})

@server.tool(description="Ask the model endpoint: base is OLLAMA_HOST or OPENAI_BASE_URL; no body: a GET")
def ask(base: str, path: str, body: dict | None = None) -> str:
    return ask_now(base, path, None if body is None else json.dumps(body))

@server.tool(description="The same from a child process")
def ask_in_child(base: str, path: str, body: dict | None = None) -> str:
    code = "import sys, thinker_tool; print(thinker_tool.ask_now(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))"
    done = subprocess.run([sys.executable, "-c", code, base, path, *([] if body is None else [json.dumps(body)])],
                          capture_output=True, text=True, env={**{k: v for k, v in os.environ.items() if k != "THINKER_RUN"}, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return done.stdout.strip() or done.stderr[-500:]

@server.tool(description="The model environment this server got")
def env() -> str:
    return json.dumps({k: os.environ.get(k) for k in ("OLLAMA_HOST", "OPENAI_BASE_URL", "OPENAI_API_KEY", "MCPFLEET_MODEL")})

if __name__ == "__main__" or os.environ.get("THINKER_RUN"):
    server.run()
"""

# Code run by the exec server (no inference): it looks for the thinker's endpoint in /proc (each
# server runs under a uid of its own and gets its token over the launcher's pipe, so none is there),
# then tries the endpoint with the token leaked to it (LEAKED) and without it.
STOLEN = """
import glob, json, urllib.error, urllib.request
found = None
for path in glob.glob("/proc/[0-9]*/environ"):
    try:
        for item in open(path, "rb").read().split(b"\\0"):
            if item.startswith(b"OLLAMA_HOST="):
                found = item.decode().partition("=")[2]
    except OSError:
        pass
print(json.dumps({"host": found}))
leaked = LEAKED
for url in (leaked + "/api/tags", leaked.rpartition("/")[0] + "/api/tags"):
    try:
        urllib.request.urlopen(url, timeout=30)
        print(json.dumps({"url": url, "status": 200}))
    except urllib.error.HTTPError as exc:
        print(json.dumps({"url": url, "status": exc.code, "body": json.loads(exc.read())}))
"""


class InferenceServers:
    """The fixture servers plus `thinker`, which declares inference, its code put in the tools dir."""

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        code = f"import os, sys; sys.path.insert(0, '{TOOLS}/{REVISION}'); os.environ['THINKER_RUN'] = '1'; import thinker_tool"
        return (*SERVERS, ServerSpec("thinker", ("python", "-c", code), revision=REVISION, inference=True))

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        tools_dir.mkdir(mode=0o755, exist_ok=True)
        (tools_dir / REVISION).mkdir(mode=0o755, exist_ok=True)
        (tools_dir / REVISION / "thinker_tool.py").write_text(THINKER)


async def ask(sandbox, base: str, path: str, body: dict[str, Any] | None = None, *, child: bool = False) -> dict[str, Any]:
    arguments: dict[str, Any] = {"base": base, "path": path}
    if body is not None:
        arguments["body"] = body
    result = text(await call(sandbox, "ask_in_child" if child else "ask", server="thinker", **arguments))
    return json.loads(result)


def chat(max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], **extra,
            "max_tokens": max_tokens, "options": {"num_predict": max_tokens, "temperature": 0}}


async def test_a_tool_asks_the_real_model_in_both_apis_charged_to_its_user_and_server(fleets, db_pool, local_model):
    fleet = await fleets("thinker")
    router = Router([local_model], db_pool)
    manager = SandboxManager(fleet.home, fleet.pool, fleet.backend, InferenceServers(), lifecycle=fleet.lifecycle,
                             models=SandboxModels(router))
    await manager.start()
    fleet.managers.append(manager)
    alice, bob = await fleet.user("alice"), await fleet.user("bob")
    sandbox = await manager.ensure(*alice)

    # Only the thinker has the model environment.
    env = json.loads(text(await call(sandbox, "env", server="thinker")))
    assert env["OLLAMA_HOST"].startswith("http://127.0.0.1:") and env["OPENAI_BASE_URL"] == env["OLLAMA_HOST"] + "/v1"
    assert env["MCPFLEET_MODEL"] == "default" and env["OPENAI_API_KEY"]
    listed = await sh(sandbox, "env | grep -E '^(OLLAMA_HOST|OPENAI_BASE_URL|OPENAI_API_KEY|MCPFLEET_MODEL)=' || echo none")
    assert listed["stdout"].strip() == "none"

    # Ollama: whole, streamed (NDJSON, its default), generate, embed, tags, version.
    whole = await ask(sandbox, "OLLAMA_HOST", "/api/chat", {**chat(), "stream": False})
    answer = json.loads(whole["body"])
    assert whole["status"] == 200 and answer["done"] and answer["message"]["role"] == "assistant"
    assert answer["eval_count"] > 0 and answer["prompt_eval_count"] > 0 and answer["model"]
    streamed = await ask(sandbox, "OLLAMA_HOST", "/api/chat", chat(max_tokens=20))
    assert streamed["status"] == 200 and streamed["type"] == "application/x-ndjson"
    *pieces, last = [json.loads(line) for line in streamed["body"].splitlines()]
    assert len(pieces) > 1 and not any(p["done"] for p in pieces) and last["done"] and last["eval_count"] > 0
    assert all(isinstance(p["message"]["content"], str) for p in pieces)
    generated = await ask(sandbox, "OLLAMA_HOST", "/api/generate", {"model": "default", "prompt": "Hello", "options": {"num_predict": 8}})
    lines = [json.loads(line) for line in generated["body"].splitlines()]
    assert generated["status"] == 200 and lines[-1]["done"] and all("response" in line for line in lines)
    embedded = await ask(sandbox, "OLLAMA_HOST", "/api/embed", {"model": "default", "input": ["one", "two words"]})
    vectors = json.loads(embedded["body"])["embeddings"]
    assert embedded["status"] == 200 and len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 10
    tags = json.loads((await ask(sandbox, "OLLAMA_HOST", "/api/tags"))["body"])
    assert [m["name"] for m in tags["models"]] == [answer["model"]]
    assert (await ask(sandbox, "OLLAMA_HOST", "/api/version"))["status"] == 200

    # OpenAI: whole and streamed (SSE), embeddings, models; and from a child process of the server.
    whole = await ask(sandbox, "OPENAI_BASE_URL", "/chat/completions", chat())
    completion = json.loads(whole["body"])
    assert whole["status"] == 200 and completion["object"] == "chat.completion"
    assert completion["usage"]["completion_tokens"] > 0 and completion["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = await ask(sandbox, "OPENAI_BASE_URL", "/chat/completions",
                         chat(max_tokens=20, stream=True, stream_options={"include_usage": True}), child=True)
    assert streamed["status"] == 200 and streamed["type"] == "text/event-stream"
    events = [e.removeprefix("data: ") for e in streamed["body"].split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    embedded = await ask(sandbox, "OPENAI_BASE_URL", "/embeddings", {"input": "hello"})
    assert embedded["status"] == 200 and len(json.loads(embedded["body"])["data"][0]["embedding"]) > 10
    models = json.loads((await ask(sandbox, "OPENAI_BASE_URL", "/models"))["body"])
    assert [m["id"] for m in models["data"]] == [answer["model"]]
    unknown = await ask(sandbox, "OPENAI_BASE_URL", "/chat/completions", {**chat(), "model": "no-such-model"})
    assert unknown["status"] == 404 and json.loads(unknown["body"])["error"]["code"] == "unknown_model"

    # Charged to alice and her thinker, and audited as such; bob's ask is bob's alone.
    bobs = await manager.ensure(*bob)
    bobs_answer = json.loads((await ask(bobs, "OLLAMA_HOST", "/api/chat", {**chat(), "stream": False}))["body"])
    async with db_pool.connection() as conn:
        rows = await usage.usage(conn, tenant=fleet.tenant)
        entries = [e async for e in audit.entries(conn, tenant=fleet.tenant) if e.action == "model.ask"]
    by_user = {r["user"]: r for r in rows}
    assert set(by_user) == {"alice", "bob"} and all(r["server"] == "thinker" and r["purpose"] == "tool" for r in rows)
    # Seven asks answered for alice (chat, stream, generate and embed in each API; lists are free), one for bob.
    assert by_user["alice"]["asks"] == 7 and by_user["bob"]["asks"] == 1
    assert (by_user["bob"]["tokens_in"], by_user["bob"]["tokens_out"]) == (bobs_answer["prompt_eval_count"], bobs_answer["eval_count"])
    ok = [e for e in entries if e.outcome == "ok"]
    assert sorted(e.actor for e in ok) == [f"{fleet.tenant}/alice"] * 7 + [f"{fleet.tenant}/bob"]
    assert all(e.detail["server"] == "thinker" and e.detail["purpose"] == "tool" for e in entries)
    assert [e.detail["reason"] for e in entries if e.outcome != "ok"] == ["unknown_model"]


async def test_nothing_but_the_declaring_server_can_ask(fleets, db_pool, local_model):
    fleet = await fleets("thinker-attack")
    router = Router([local_model], db_pool)
    manager = SandboxManager(fleet.home, fleet.pool, fleet.backend, InferenceServers(), lifecycle=fleet.lifecycle,
                             models=SandboxModels(router))
    await manager.start()
    fleet.managers.append(manager)
    alice = await fleet.user("alice")
    sandbox = await manager.ensure(*alice)
    # The thinker runs, its endpoint is bound; a careless tool shows its own environment, token included.
    leaked = json.loads(text(await call(sandbox, "env", server="thinker")))["OLLAMA_HOST"]
    assert leaked.startswith("http://127.0.0.1:")

    # Code run by the exec server finds no token in /proc, and the leaked one is refused by the
    # supervisor, which asks the kernel who connected; without the token, 401.
    out = await sh(sandbox, python_inside(STOLEN.replace("LEAKED", repr(leaked))))
    found, *tries = [json.loads(line) for line in out["stdout"].splitlines()]
    assert found["host"] is None, out
    assert [t["status"] for t in tries] == [403, 401], tries
    assert "is not server 'thinker' or one of its children" in tries[0]["body"]["error"]
    # No network was opened: the sandbox's only interface is its loopback.
    interfaces = await sh(sandbox, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert interfaces["stdout"].split() == ["lo"]
    async with db_pool.connection() as conn:
        assert await usage.usage(conn, tenant=fleet.tenant) == []
        assert [e async for e in audit.entries(conn, tenant=fleet.tenant) if e.action == "model.ask"] == []
