"""What the sandbox's model endpoint adds to an ask: first-token latency and tokens/s of a streamed
answer asked from inside a runsc sandbox (a server declaring inference -> the supervisor's loopback
endpoint -> the channel -> the gateway's `SandboxModels` -> the router -> llama-server) against the
same llama-server asked directly over its OpenAI API from the host.

Both sides run the same client (`CLIENT` below: http.client, an OpenAI chat-completions stream read
event by event) and time themselves with their own clock: the sandbox side runs it in a tool of the
`bencher` server, which returns its timings. Each run streams one answer of `--tokens` tokens at
temperature 0 to the same prompt, alternating direct and relayed asks so the machine's load falls on
both alike. tokens/s is counted after the first piece (pieces - 1 over the time from the first to the
last). Any error fails the bench (exit 1); it never reports a partial table.

The local model server (llama-server, Gemma 3 270M, 2 threads) is started as the fleet starts it
(scripts/models.sh must have installed it); the database is the embedded PostgreSQL in a temporary
home under /tmp, torn down at the end.

    .venv/bin/python bench/model_relay.py [--runs 20] [--tokens 64]

p99 is nearest-rank: with fewer than 100 samples it is the slowest one (for tokens/s, the lowest).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox_lifecycle import tear_down  # beside this script

from core.accounts import add_user
from core.db import migrate, open_pool, start_embedded
from core.models.local import LocalProvider
from core.models.router import Router
from gateway.model_relay import SandboxModels
from sandbox.backends.runsc import RunscBackend
from sandbox.bundle import TOOLS
from sandbox.factory import sandbox_python
from sandbox.manager import Lifecycle, SandboxManager
from sandbox.servers import ServerSpec

REVISION = "bench-relay"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]

# One streamed chat completion, timed: the same code on the host and in the sandbox.
CLIENT = '''
import http.client, json, time, urllib.parse

def stream_once(base_url, model, messages, max_tokens):
    url = urllib.parse.urlsplit(base_url)
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    connection.request("POST", url.path + "/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
    first, pieces, done = None, 0, False
    while True:
        line = response.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise RuntimeError(f"error in the stream: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                pieces += 1
                if first is None:
                    first = time.perf_counter()
    ended = time.perf_counter()
    connection.close()
    if not done or first is None or pieces < 2:
        raise RuntimeError(f"a stream without [DONE] or pieces ({pieces} pieces)")
    return {"first_s": first - started, "rate": (pieces - 1) / max(ended - first, 1e-9), "pieces": pieces}
'''

BENCHER = CLIENT + '''
import os
from mcp.server.mcpserver import MCPServer
server = MCPServer("bencher")

@server.tool(description="One timed stream through the sandbox's model endpoint")
def stream(model: str, messages: str, max_tokens: int) -> str:
    return json.dumps(stream_once(os.environ["OPENAI_BASE_URL"], model, json.loads(messages), max_tokens))

server.run()
'''


class BenchServers:
    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        code = f"import sys; sys.path.insert(0, '{TOOLS}/{REVISION}'); import bencher_tool"
        return (ServerSpec("bencher", ("python", "-c", code), revision=REVISION, inference=True),)

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        (tools_dir / REVISION).mkdir(mode=0o755, parents=True, exist_ok=True)
        (tools_dir / REVISION / "bencher_tool.py").write_text(BENCHER)


def p99(values: list[float], *, low: bool = False) -> float:
    ordered = sorted(values, reverse=low)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def main(home: Path, runs: int, tokens: int) -> int:
    url = start_embedded(home / "pg")
    migrate(url)
    pool = await open_pool(url)
    async with pool.connection() as conn:
        user = await add_user(conn, "bench")
    local = LocalProvider(home / "log")
    router = Router([local], pool)
    await router.start()
    cgroup_parent = f"/mcpfleet-bench-relay-{os.getpid()}"
    backend = RunscBackend(home / "runsc", cgroup_parent=cgroup_parent, python=sandbox_python())
    manager = SandboxManager(home, pool, backend, BenchServers(), lifecycle=Lifecycle(warm_pool_size=0, housekeeping_interval_s=3600.0),
                             models=SandboxModels(router))
    namespace: dict[str, object] = {}
    exec(CLIENT, namespace)  # the very client the sandbox side runs
    stream_once = namespace["stream_once"]
    results: dict[str, list[dict[str, float]]] = {"direct": [], "relay": []}
    try:
        await local.wait_ready(600)
        model = (await router.route(None))[1]
        await manager.start()
        sandbox = await manager.ensure(user.user_id, user.tenant, "bench")

        async def relayed() -> dict[str, float]:
            result = await sandbox.client.request("bencher", "tools/call", {"name": "stream", "arguments": {
                "model": "default", "messages": json.dumps(PROMPT), "max_tokens": tokens}}, timeout=600)
            if result.get("isError"):
                raise RuntimeError(f"the relayed stream failed: {result['content'][0]['text']}")
            return json.loads(result["content"][0]["text"])

        def direct() -> dict[str, float]:
            return stream_once(local.base_url, model, PROMPT, tokens)  # type: ignore[operator]

        await asyncio.to_thread(direct)  # warm-up, both ways: the prompt's cache, the first allocations
        await relayed()
        for _ in range(runs):
            results["direct"].append(await asyncio.to_thread(direct))
            results["relay"].append(await relayed())
    finally:
        await router.close()
        await tear_down(manager, backend, home, cgroup_parent, pool)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# Models for tools: the sandbox relay against llama-server directly\n\nmodel {model}, llama-server with "
          f"{local.threads} threads, {runs} runs of {tokens} tokens each, streamed (OpenAI SSE); load average after: {load}\n")
    print("| path | first token median | first token p99 | tokens/s median | tokens/s p99 (low) | n |")
    print("|---|---:|---:|---:|---:|---:|")
    medians = {}
    for path, measured in results.items():
        firsts = [m["first_s"] * 1000 for m in measured]
        rates = [m["rate"] for m in measured]
        medians[path] = (statistics.median(firsts), statistics.median(rates))
        print(f"| {path} | {medians[path][0]:.1f} ms | {p99(firsts):.1f} ms | {medians[path][1]:.1f} | "
              f"{p99(rates, low=True):.1f} | {len(measured)} |")
    print(f"\nrelay / direct (medians): first token x{medians['relay'][0] / medians['direct'][0]:.2f} "
          f"(+{medians['relay'][0] - medians['direct'][0]:.1f} ms), tokens/s x{medians['relay'][1] / medians['direct'][1]:.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if shutil.which("runsc") is None:
        raise SystemExit("bench/model_relay.py: FAILED: runsc is not installed")
    home = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))  # short: the channel's socket path stays within 107 bytes
    # Registered before the embedded PostgreSQL registers its own stop: it is down before its data dir goes.
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    try:
        sys.exit(asyncio.run(main(home, options.runs, options.tokens)))
    except Exception as exc:
        print(f"bench/model_relay.py: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
