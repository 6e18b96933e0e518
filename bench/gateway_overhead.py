"""What the gateway costs: the same tool call served directly and through the gateway into a sandbox.

(a) `workspace__read_file`'s server (`python -m mcp_servers.workspace`) served directly over
    Streamable HTTP, no gateway, no sandbox;
(b) the same call through `mcpfleet up`: API-key auth, routing, the user's runsc sandbox, its
    supervisor and the same server as a stdio child.

Both are measured in this one run with `wrk` (a C load generator, so the client is not the
bottleneck), sequentially (one connection) and with 50 concurrent connections, using the stateless
2026-07-28 protocol revision: one POST per call. Prints p50 / p99 latency and calls/s, and b/a.
The fleet runs with the rate limits lifted (LOAD_SETTINGS); any answer that is not a tool result
(a 429, a JSON-RPC error, an isError result, a socket error) stops the run with what it said.

Each gateway variant (`--variants`) is a fleet of its own, started and measured one after the other in
this run: by default the general path (`MCPFLEET_FAST_PATH=off`, the baseline), the fast path
(gateway/fast_call.py), then the same calls in one 2025-11-25 session (the bench opens it with
`initialize`; each call a POST with its `Mcp-Session-Id`, answered as an event stream): `session-general`
served by the SDK's session transport (`MCPFLEET_FAST_PATH=off`, the sessions' baseline) and `session`
by the session fast path (gateway/fast_session_call.py). `replicas2` adds `up --replicas 2`. The fast
paths' own counter (`mcpfleet_tool_calls_by_path_total` on /metrics) must show they served every
call of the fast runs and none of the baselines', or the run stops. `--profile` samples each gateway with py-spy.

    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--profile] [--variants general,fast,session-general,session,replicas2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "0"},
}

LOAD_SETTINGS = {
    # The benchmark's one user sends far more than the default 600 requests a minute and 16 calls
    # in flight: its fleet lifts both, or it would measure 429s.
    "MCPFLEET_RATE_LIMIT_PER_MIN": "0",
    "MCPFLEET_TOOL_RATE_LIMIT_PER_MIN": "0",
    "MCPFLEET_MAX_CONCURRENT_CALLS": "0",
}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
%(revision)s
%(auth)s
-- Every answer is read: a 200 that carries a JSON-RPC error or an isError result is a failed call,
-- never a fast answer. Each thread counts its own; done() adds them up.
local threads = {}
function setup(thread) table.insert(threads, thread); thread:set("tid", #threads) end
function init(args) failed = 0; sample = ""; sent = 0 end
%(ids)s
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"result"', 1, true) or string.find(body, '"isError"%%s*:%%s*true')
      or string.find(body, '"error"%%s*:%%s*{') then
    failed = failed + 1
    if sample == "" then sample = status .. " " .. string.sub(body, 1, 300) end
  end
end
done = function(summary, latency, requests)
  local failed_total, first = 0, ""
  for _, thread in ipairs(threads) do
    failed_total = failed_total + thread:get("failed")
    if first == "" then first = thread:get("sample") end
  end
  io.write(string.format("RESULT %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, failed_total))
  if first ~= "" then io.write("FIRST-FAILURE " .. string.gsub(first, "\\n", " ") .. "\\n") end
end
"""

SESSION_IDS = """
-- Requests in flight in one session need ids of their own (the session routes each answer by its id).
request = function()
  sent = sent + 1
  return wrk.format(nil, nil, nil, (string.gsub(wrk.body, '"id": 1,', '"id": "' .. tid .. '-' .. sent .. '",', 1)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def call_body(tool: str, arguments: dict, session: str | None = None) -> str:
    """A stateless 2026-07-28 call (its envelope in `_meta`), or one in a 2025-11-25 session."""
    params = {"name": tool, "arguments": arguments} if session else {"name": tool, "arguments": arguments, "_meta": META}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})


def call_headers(tool: str, session: str | None) -> dict[str, str]:
    if session:
        return {"MCP-Protocol-Version": "2025-11-25", "Mcp-Session-Id": session}
    return {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool}


def answer_of(response: httpx.Response) -> dict:
    """The JSON-RPC answer of a POST: its JSON body, or the last `data:` event of its event stream."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return json.loads(events[-1]) if events else {}
    return response.json()


def check_call(url: str, tool: str, arguments: dict, key: str | None, session: str | None = None) -> None:
    """One call by hand first: the load must measure successful calls, not fast errors."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **call_headers(tool, session)}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.post(url, content=call_body(tool, arguments, session), headers=headers, timeout=120)
    reply = answer_of(response)
    if response.status_code != 200 or "result" not in reply or reply["result"].get("isError"):
        raise SystemExit(f"{url} {tool}: not a successful call: {response.status_code} {response.text[:300]}")


def open_session(url: str, key: str) -> str:
    """A 2025-11-25 session (initialize, then notifications/initialized); its id."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-11-25", "Authorization": f"Bearer {key}"}
    hello = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}
    response = httpx.post(url, json=hello, headers=headers, timeout=120)
    session = response.headers.get("mcp-session-id")
    if response.status_code != 200 or not session or "result" not in answer_of(response):
        raise SystemExit(f"{url}: no session opened: {response.status_code} {response.text[:300]}")
    done = httpx.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                      headers={**headers, "Mcp-Session-Id": session}, timeout=60)
    if done.status_code != 202:
        raise SystemExit(f"{url}: notifications/initialized got {done.status_code} {done.text[:300]}")
    return session


def wrk(url: str, tool: str, arguments: dict, key: str | None, connections: int, seconds: int, workdir: Path,
        session: str | None = None) -> dict:
    script = workdir / f"{tool}-{connections}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    revision = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in call_headers(tool, session).items())
    script.write_text(WRK_SCRIPT % {"body": call_body(tool, arguments, session), "revision": revision, "auth": auth,
                                    "ids": SESSION_IDS if session else ""})
    threads = 1 if connections == 1 else 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    if match is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    requests, duration_us, p50_us, p99_us, bad_status, socket_errors, failed = map(int, match.groups())
    if bad_status or socket_errors or failed or requests == 0:
        # A refused or failed call is quick: counted as an answer it would flatter every figure.
        first = re.search(r"^FIRST-FAILURE (.*)$", out, re.M)
        raise SystemExit(
            f"{url} {tool} with {connections} clients: {failed} of {requests} answers were not results "
            f"({bad_status} non-2xx, {socket_errors} socket errors); first: {first.group(1) if first else '-'}"
        )
    return {"calls": requests, "rate": requests / (duration_us / 1e6), "p50_ms": p50_us / 1e3, "p99_ms": p99_us / 1e3}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of these processes (those still alive)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def sandbox_pids(home: Path) -> list[int]:
    """The runsc processes (sandbox, gofer) of the fleet at `home`."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(str(home) in a for a in (p.info["cmdline"] or []))
            and "runsc" in " ".join(p.info["cmdline"] or [])]


def profile(pid: int, seconds: int, out: Path) -> str:
    if shutil.which("py-spy") is None and not (Path(PYTHON).parent / "py-spy").exists():
        return "(py-spy is not installed: pip install py-spy)"
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    subprocess.run([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--format", "raw",
                    "--output", str(out), "--nonblocking"], capture_output=True, check=False)
    return summarize_profile(out)


def summarize_profile(raw: Path, top: int = 12) -> str:
    """Where the samples were, from py-spy's collapsed stacks: by package (self time), by function
    (self time: the frame on top of the stack) and by function inclusive (anywhere on the stack)."""
    by_area: dict[str, int] = {}
    by_self: dict[str, int] = {}
    by_inclusive: dict[str, int] = {}
    overall = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        overall += n
        frames = [_frame(f) for f in stack.split(";")]
        area = frames[-1][0]
        by_area[area] = by_area.get(area, 0) + n
        by_self[frames[-1][1]] = by_self.get(frames[-1][1], 0) + n
        for name in {f[1] for f in frames}:
            by_inclusive[name] = by_inclusive.get(name, 0) + n

    def table(title: str, totals: dict[str, int], rows_shown: int = top) -> str:
        rows = sorted(totals.items(), key=lambda kv: -kv[1])[:rows_shown]
        return title + "\n" + "\n".join(f"  {100 * n / max(overall, 1):5.1f}%  {name}" for name, n in rows)

    return "\n\n".join([
        table("self time by package:", by_area),
        table("self time by function:", by_self),
        # Below the ASGI layers every request passes (each near the top, with the same share), the steps.
        table("inclusive time by function, the ASGI layers every request passes through left out:",
              {k: v for k, v in by_inclusive.items() if k.split(" ")[-1].startswith(("(gateway", "(mcp", "(sandbox",
                                                                                        "(registry", "(pydantic"))
               and not k.endswith(("(gateway/serve)", "(gateway/tracing)", "(gateway/http_headers)", "(gateway/limits)",
                                   "(gateway/oauth/resource)", "(gateway/refusals)", "(gateway/forward)"))
               or k.startswith(("HttpTracing", "McpTracing", "LimitsMiddleware"))}, rows_shown=20),
    ])


def _frame(frame: str) -> tuple[str, str]:
    """(package, "function (module:line)") of one collapsed-stack frame `function (path:line)`."""
    m = re.match(r"(?P<fn>.*?) \((?:.*/site-packages/|.*/lib/python3\.\d+/|.*?/(?=gateway/|sandbox/|core/|registry/))?"
                 r"(?P<module>[^:()]+)(?::(?P<line>\d+))?\)$", frame)
    if m is None:
        return frame, frame
    module = m["module"].removesuffix(".py")
    return module.split("/")[0], f"{m['fn']} ({module})"


def gateway_pids(pid: int) -> list[int]:
    """The gateway process and, with `--replicas`, its replica processes (Python ones: not the database, not runsc)."""
    import psutil

    parent = psutil.Process(pid)
    pids = [pid]
    for child in parent.children(recursive=True):
        try:
            if Path(child.exe()).name.startswith("python"):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class Fleet:
    """`mcpfleet up` with its own home and embedded database, one user and an API key."""

    def __init__(self, work: Path, name: str, settings: dict[str, str], up_args: list[str]):
        self.home = work / name
        self.port = free_port()
        self.env = {**os.environ, "MCPFLEET_HOME": str(self.home), "MCPFLEET_PORT": str(self.port), **LOAD_SETTINGS,
                    **settings}
        self.env.pop("DATABASE_URL", None)
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log = work / f"{name}.log"
        self.process = subprocess.Popen([PYTHON, "-m", "cli", "up", *up_args], cwd=ROOT, env=self.env,
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{self.port}/healthz", self.process, timeout=600)  # a loaded machine is slow
            subprocess.run([PYTHON, "-m", "cli", "users", "add", "bench"], cwd=ROOT, env=self.env, check=True,
                           capture_output=True)
            self.key = subprocess.run([PYTHON, "-m", "cli", "keys", "create", "bench"], cwd=ROOT, env=self.env,
                                      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            started = time.perf_counter()
            check_call(self.url, "workspace__write_file", {"path": "hello.txt", "content": "hello\n"}, self.key)
            self.cold_ms = (time.perf_counter() - started) * 1e3
        except BaseException:  # a fleet that never served is stopped all the same
            self.stop()
            raise

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def fast_calls(self) -> float:
        """tools/call requests the fast path served, from /metrics (loopback may read it)."""
        page = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return sum(float(m.group(1)) for m in re.finditer(r'^mcpfleet_tool_calls_by_path_total\{path="fast"[^}]*\} (\S+)$',
                                                             page, re.M))


# What each gateway run is: its name in the tables, its settings, its `up` arguments.
VARIANTS = {
    "general": ("gateway, general path (MCPFLEET_FAST_PATH=off)", {"MCPFLEET_FAST_PATH": "off"}, []),
    "fast": ("gateway, fast path", {"MCPFLEET_FAST_PATH": "on"}, []),
    "session-general": ("gateway, 2025-11-25 session, SDK's session path (MCPFLEET_FAST_PATH=off)",
                        {"MCPFLEET_FAST_PATH": "off"}, []),
    "session": ("gateway, 2025-11-25 session, fast path", {"MCPFLEET_FAST_PATH": "on"}, []),
    "replicas2": ("gateway, fast path, up --replicas 2", {"MCPFLEET_FAST_PATH": "on"}, ["--replicas", "2"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="profile each gateway with py-spy under load")
    parser.add_argument("--variants", default="general,fast,session-general,session",
                        help=f"gateway runs to compare, in order, comma-separated, of: {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk (make bench installs it)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")

    work = Path(tempfile.mkdtemp(prefix="mcpfleet-bench-"))
    direct: subprocess.Popen | None = None
    fleet: Fleet | None = None
    try:
        # (a) the workspace server alone.
        direct_root = work / "direct-workspace"
        direct_root.mkdir()
        (direct_root / "hello.txt").write_text("hello\n")
        direct_port = free_port()
        direct = subprocess.Popen(
            [PYTHON, "-m", "mcp_servers.workspace", "--transport", "streamable-http", "--port", str(direct_port)],
            cwd=ROOT, env={**os.environ, "MCPFLEET_WORKSPACE_ROOT": str(direct_root)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        direct_url = f"http://127.0.0.1:{direct_port}/mcp"
        wait_ready(direct_url, direct)
        read = {"path": "hello.txt"}
        check_call(direct_url, "read_file", read, None)
        levels = (1, args.concurrency)
        baseline = {c: {**wrk(direct_url, "read_file", read, None, c, args.seconds, work), "load": load_average()}
                    for c in levels}

        # (b) the same call through each gateway variant, one fleet at a time (each its own home and sandbox).
        results: dict[str, dict[int, dict]] = {}
        colds: dict[str, float] = {}
        profiles: dict[str, str] = {}
        for variant in variants:
            label, settings, up_args = VARIANTS[variant]
            fleet = Fleet(work, variant, settings, up_args)
            colds[variant] = fleet.cold_ms
            session = open_session(fleet.url, fleet.key) if variant.startswith("session") else None
            check_call(fleet.url, "workspace__read_file", read, fleet.key, session)
            sandbox = sandbox_pids(fleet.home)
            gateway = gateway_pids(fleet.process.pid)
            fast_before = fleet.fast_calls()
            results[variant] = {}
            for connections in levels:
                before = (cpu_seconds(gateway), cpu_seconds(sandbox))
                row = wrk(fleet.url, "workspace__read_file", read, fleet.key, connections, args.seconds, work, session)
                after = (cpu_seconds(gateway), cpu_seconds(sandbox))
                row["gateway_cpu_ms"] = (after[0] - before[0]) * 1e3 / max(row["calls"], 1)
                row["sandbox_cpu_ms"] = (after[1] - before[1]) * 1e3 / max(row["calls"], 1)
                row["load"] = load_average()
                results[variant][connections] = row
            served_fast = fleet.fast_calls() - fast_before
            measured = sum(r["calls"] for r in results[variant].values())
            # (A standby replica keeps its own counter: `replicas2` is not checked.)
            if (variant in ("general", "session-general") and served_fast) or (
                    variant in ("fast", "session") and served_fast < measured):
                raise SystemExit(f"{label}: the fast path served {served_fast:.0f} of {measured} calls")
            if args.profile:
                load = subprocess.Popen(["wrk", "-t", "2", "-c", str(args.concurrency), "-d", f"{args.seconds + 2}s",
                                         "-s", str(work / f"workspace__read_file-{args.concurrency}.lua"), fleet.url],
                                        stdout=subprocess.DEVNULL)
                time.sleep(1)
                profiles[variant] = f"(load {load_average()})\n" + profile(fleet.process.pid, args.seconds,
                                                                            work / f"{variant}.pyspy")
                load.wait()
            fleet.stop()
            fleet = None

        print(f"\nGateway overhead: one workspace read_file call (2026-07-28, stateless, but for the session "
              f"variants), {args.seconds} s per run, "
              f"wrk, this machine ({os.cpu_count()} cores; load = 1/5/15-minute load average after the run).")
        print("First call through each gateway (cold sandbox start): "
              + ", ".join(f"{v} {colds[v]:.0f} ms" for v in variants) + ".\n")
        print("| clients | path | p50 ms | p99 ms | calls/s | p50 vs direct | calls/s vs direct | gateway CPU ms/call "
              "| sandbox CPU ms/call | load |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for connections in levels:
            a = baseline[connections]
            print(f"| {connections} | (a) direct | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['rate']:.0f} | 1.00x | 1.00x "
                  f"| - | - | {a['load']} |")
            for variant in variants:
                b = results[variant][connections]
                print(f"| {connections} | {VARIANTS[variant][0]} | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['rate']:.0f} "
                      f"| {b['p50_ms'] / a['p50_ms']:.2f}x | {b['rate'] / a['rate']:.2f}x | {b['gateway_cpu_ms']:.2f} "
                      f"| {b['sandbox_cpu_ms']:.2f} | {b['load']} |")
        for fast, general, what in (("fast", "general", "Fast path against the general path"),
                                    ("session", "session-general", "Session fast path against the SDK's session path")):
            if general not in results or fast not in results:
                continue
            print(f"\n{what} (same run):\n")
            print("| clients | p50 | p99 | calls/s | gateway CPU per call |")
            print("|---:|---:|---:|---:|---:|")
            for connections in levels:
                g, f = results[general][connections], results[fast][connections]
                print(f"| {connections} | {f['p50_ms'] / g['p50_ms']:.2f}x | {f['p99_ms'] / g['p99_ms']:.2f}x "
                      f"| {f['rate'] / g['rate']:.2f}x | {f['gateway_cpu_ms'] / max(g['gateway_cpu_ms'], 1e-9):.2f}x |")
        for variant, text in profiles.items():
            print(f"\nWhere the gateway's time goes under {args.concurrency} clients, {VARIANTS[variant][0]} "
                  f"(py-spy, share of samples) {text}")
    finally:
        if fleet is not None:
            fleet.stop()
        if direct is not None:
            direct.send_signal(signal.SIGTERM)
            try:
                direct.wait(timeout=60)
            except subprocess.TimeoutExpired:
                direct.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
