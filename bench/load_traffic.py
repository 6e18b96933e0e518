"""The load of bench/load_faults.py: many clients of many users doing mixed workspace calls, and what
they saw (every call's start, end, outcome), summed up per phase and per fault window.

Each client belongs to one user (client i to user i mod U) and loops: write a file of its own with
content no other write has, read back the last file it wrote successfully (checking the content),
list its directory. Calls are stateless 2026-07-28 JSON-RPC `tools/call` POSTs. A call counts as a
success only if it is answered 200 with a JSON-RPC result that is not `isError` (and, for a read,
with the content written); a JSON-RPC error, an isError result, a non-200, a socket error or a
timeout is a failure. After a failure a client waits 0.2 s, as a real client would, rather than
spinning on a refused connection.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field

import httpx

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "bench-load", "version": "0"},
}
CALL_TIMEOUT_S = 30.0


@dataclass
class Call:
    user: str
    tool: str
    arguments: dict
    started: float  # monotonic
    ended: float
    ok: bool
    error: str = ""


@dataclass
class Record:
    """Everything the clients did, and what the successful writes wrote (user -> path -> content)."""

    calls: list[Call] = field(default_factory=list)
    written: dict[str, dict[str, str]] = field(default_factory=dict)


def _answer(response: httpx.Response) -> dict:
    if "text/event-stream" in response.headers.get("content-type", ""):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1]) if data else {}
    return response.json()


def _text(result: dict) -> str:
    return "".join(part.get("text", "") for part in result.get("content") or [] if isinstance(part, dict))


async def call(client: httpx.AsyncClient, url: str, key: str, tool: str, arguments: dict) -> tuple[bool, str, dict]:
    """One tools/call; (ok, error text, result)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": META}}
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool}
    try:
        response = await client.post(url, json=body, headers=headers, timeout=CALL_TIMEOUT_S)
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {response.text[:200]}", {}
        reply = _answer(response)
    except (httpx.HTTPError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:200], {}
    if "error" in reply:
        return False, f"JSON-RPC error {json.dumps(reply['error'])[:200]}", {}
    result = reply.get("result")
    if not isinstance(result, dict):
        return False, f"no result: {json.dumps(reply)[:200]}", {}
    if result.get("isError"):
        return False, f"isError: {_text(result)[:200]}", result
    return True, "", result


async def _client(client: httpx.AsyncClient, n: int, user: str, key: str, url: str, until: float, record: Record,
                  run: str) -> None:
    last_written: tuple[str, str] | None = None
    step = 0
    while time.monotonic() < until:
        kind = step % 3
        if kind == 0 or last_written is None:
            path, content = f"{run}/c{n}/w{step}.txt", f"{run} client {n} step {step} {uuid.uuid4().hex}"
            tool, arguments = "workspace__write_file", {"path": path, "content": content}
        elif kind == 1:
            tool, arguments = "workspace__read_file", {"path": last_written[0]}
        else:
            tool, arguments = "workspace__list_dir", {"path": f"{run}/c{n}"}
        started = time.monotonic()
        ok, error, result = await call(client, url, key, tool, arguments)
        if ok and tool == "workspace__read_file" and last_written and last_written[1] not in _text(result):
            ok, error = False, f"read back other content than written: {_text(result)[:100]!r}"
        record.calls.append(Call(user, tool, arguments, started, time.monotonic(), ok, error))
        if ok and tool == "workspace__write_file":
            last_written = (arguments["path"], arguments["content"])
            record.written.setdefault(user, {})[arguments["path"]] = arguments["content"]
        step += 1
        if not ok:
            await asyncio.sleep(0.2)


async def load(url: str, keys: dict[str, str], clients: int, seconds: float, record: Record, run: str) -> None:
    """Every client made (one connection each) before the clock starts: making 500 of them takes the
    generator a while on a loaded machine, and that must not eat the phase."""
    users = sorted(keys)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # one for all: each client would otherwise load the CA store again
    made = [httpx.AsyncClient(limits=limits, verify=tls) for _ in range(clients)]
    try:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_client(made[n], n, users[n % len(users)], keys[users[n % len(users)]], url, until,
                                       record, run) for n in range(clients)))
    finally:
        await asyncio.gather(*(client.aclose() for client in made))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def phase_row(name: str, calls: list[Call], seconds: float) -> str:
    good = [(c.ended - c.started) * 1e3 for c in calls if c.ok]
    errors = sum(1 for c in calls if not c.ok)
    return (f"| {name} | {len(calls)} | {errors} | {percentile(good, 50):.1f} | {percentile(good, 95):.1f} | "
            f"{percentile(good, 99):.1f} | {len(good) / seconds:.1f} |")


def recovery(calls: list[Call], at: float, end: float) -> tuple[int, str]:
    """Failed calls that started in [at, end), and seconds from the fault to the end of the first
    success that started after the last of them started (a call left hanging until its timeout
    would otherwise count its 30 s as downtime); "-" if none failed, "not recovered" if none
    succeeded after."""
    window = [c for c in calls if at <= c.started < end]
    failed = [c for c in window if not c.ok]
    if not failed:
        return 0, "- (none failed)"
    last = max(c.started for c in failed)
    after = [c.ended for c in calls if c.ok and c.started > last]
    return len(failed), (f"{min(after) - at:.1f}" if after else "not recovered")


def first_errors(calls: list[Call], limit: int = 5) -> list[str]:
    seen: dict[str, int] = {}
    for c in calls:
        if not c.ok:
            seen[c.error[:120]] = seen.get(c.error[:120], 0) + 1
    return [f"{n} x {text}" for text, n in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]
