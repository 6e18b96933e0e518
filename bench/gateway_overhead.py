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

    .venv/bin/python bench/gateway_overhead.py [--seconds 10] [--profile]
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
wrk.headers["MCP-Protocol-Version"] = "2026-07-28"
wrk.headers["Mcp-Method"] = "tools/call"
wrk.headers["Mcp-Name"] = "%(tool)s"
%(auth)s
-- Every answer is read: a 200 that carries a JSON-RPC error or an isError result is a failed call,
-- never a fast answer. Each thread counts its own; done() adds them up.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) failed = 0; sample = "" end
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


def call_body(tool: str, arguments: dict) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": tool, "arguments": arguments, "_meta": META}})


def check_call(url: str, tool: str, arguments: dict, key: str | None) -> None:
    """One call by hand first: the load must measure successful calls, not fast errors."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    response = httpx.post(url, content=call_body(tool, arguments), headers=headers, timeout=120)
    reply = response.json()
    if response.status_code != 200 or "result" not in reply or reply["result"].get("isError"):
        raise SystemExit(f"{url} {tool}: not a successful call: {response.status_code} {response.text[:300]}")


def wrk(url: str, tool: str, arguments: dict, key: str | None, connections: int, seconds: int, workdir: Path) -> dict:
    script = workdir / f"{tool}-{connections}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script.write_text(WRK_SCRIPT % {"body": call_body(tool, arguments), "tool": tool, "auth": auth})
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


def summarize_profile(raw: Path, top: int = 15) -> str:
    """Self time per package (where the sampled frame itself was), from py-spy's collapsed stacks."""
    totals: dict[str, int] = {}
    overall = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        overall += n
        leaf = stack.split(";")[-1]
        m = re.search(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/|.*/main/)?([^/:()]+)", leaf)
        area = m.group(1).removesuffix(".py") if m else leaf
        totals[area] = totals.get(area, 0) + n
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"  {100 * n / max(overall, 1):5.1f}%  {area}" for area, n in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="profile the gateway with py-spy under load")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk (make bench installs it)")

    work = Path(tempfile.mkdtemp(prefix="mcpfleet-bench-"))
    processes: list[subprocess.Popen] = []
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
        processes.append(direct)
        direct_url = f"http://127.0.0.1:{direct_port}/mcp"
        wait_ready(direct_url, direct)

        # (b) the fleet, with its own home and embedded database.
        gateway_port = free_port()
        env = {**os.environ, "MCPFLEET_HOME": str(work / "fleet"), "MCPFLEET_PORT": str(gateway_port), **LOAD_SETTINGS}
        env.pop("DATABASE_URL", None)
        cli = [PYTHON, "-m", "cli"]
        gateway = subprocess.Popen([*cli, "up"], cwd=ROOT, env=env, stdout=open(work / "gateway.log", "wb"),
                                   stderr=subprocess.STDOUT)
        processes.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway_port}/mcp"
        wait_ready(f"http://127.0.0.1:{gateway_port}/healthz", gateway)
        subprocess.run([*cli, "users", "add", "bench"], cwd=ROOT, env=env, check=True, capture_output=True)
        key = subprocess.run([*cli, "keys", "create", "bench"], cwd=ROOT, env=env, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        started = time.perf_counter()
        check_call(gateway_url, "workspace__write_file", {"path": "hello.txt", "content": "hello\n"}, key)
        cold = time.perf_counter() - started

        read = {"path": "hello.txt"}
        check_call(direct_url, "read_file", read, None)
        check_call(gateway_url, "workspace__read_file", read, key)

        rows = []
        sandbox = sandbox_pids(work / "fleet")
        for connections in (1, args.concurrency):
            a = wrk(direct_url, "read_file", read, None, connections, args.seconds, work)
            before = (cpu_seconds([direct.pid]), cpu_seconds([gateway.pid]), cpu_seconds(sandbox))
            b = wrk(gateway_url, "workspace__read_file", read, key, connections, args.seconds, work)
            after = (cpu_seconds([direct.pid]), cpu_seconds([gateway.pid]), cpu_seconds(sandbox))
            b["gateway_cpu_ms"] = (after[1] - before[1]) * 1e3 / max(b["calls"], 1)
            b["sandbox_cpu_ms"] = (after[2] - before[2]) * 1e3 / max(b["calls"], 1)
            rows.append((connections, a, b))

        print(f"\nGateway overhead: one workspace read_file call, {args.seconds} s per run, wrk, this machine "
              f"({os.cpu_count()} cores). First call through the gateway (cold sandbox start): {cold * 1e3:.0f} ms.\n")
        print("| clients | path | p50 ms | p99 ms | calls/s |")
        print("|---:|---|---:|---:|---:|")
        for connections, a, b in rows:
            print(f"| {connections} | (a) direct | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['rate']:.0f} |")
            print(f"| {connections} | (b) gateway + sandbox | {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['rate']:.0f} |")
            print(f"| {connections} | ratio b/a | {b['p50_ms'] / a['p50_ms']:.2f}x | {b['p99_ms'] / a['p99_ms']:.2f}x | "
                  f"{b['rate'] / a['rate']:.2f}x |")

        print("\nCPU per call through the gateway (ms of CPU time, user + system):\n")
        print("| clients | gateway process | sandbox (runsc sentry + gofer) |")
        print("|---:|---:|---:|")
        for connections, _, b in rows:
            print(f"| {connections} | {b['gateway_cpu_ms']:.2f} | {b['sandbox_cpu_ms']:.2f} |")

        if args.profile:
            print(f"\nWhere the gateway's time goes under {args.concurrency} clients (py-spy, inclusive share of samples):")
            load = subprocess.Popen(["wrk", "-t", "2", "-c", str(args.concurrency), "-d", f"{args.seconds + 2}s",
                                     "-s", str(work / f"workspace__read_file-{args.concurrency}.lua"), gateway_url],
                                    stdout=subprocess.DEVNULL)
            time.sleep(1)
            print(profile(gateway.pid, args.seconds, work / "gateway.pyspy"))
            load.wait()
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
