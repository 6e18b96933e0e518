"""Load and faults: many clients of many users through `mcpfleet up --replicas N`, once plain and once
while faults strike at known times; what each fault cost, and proof that nothing was lost.

Loopback only, bounded in time. The fleet has an embedded PostgreSQL and a redis-server of its own
(REDIS_URL: the rate limits, set high, go through it). Mixed workspace calls (bench/load_traffic.py)
run for --seconds in each phase. The faults phase, at fixed fractions of its length:

  1. a standby gateway replica SIGKILLed (the parent starts another);
  2. the replica that holds the sandbox lease SIGKILLed (a standby takes the lease, adopts the sandboxes);
  3. PostgreSQL stopped (`pg_ctl stop -m fast`), 3 s down, started again;
  4. Redis stopped (SIGTERM), 5 s down, started again on its port;
  5. one user's sandbox killed (`runsc kill ... KILL`): only that user's calls are affected.

Then: every successful call has its `tool.call` audit entry with outcome ok (matched by tool and
arguments hash), `mcpfleet audit verify` passes, every file a successful write wrote reads back with
its content, and the approvals table is unchanged. Exits 1 if the plain phase had any failed call or
anything was lost.

    .venv/bin/python bench/load_faults.py [--clients 500] [--users 100] [--seconds 180] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_faults import (  # noqa: E402
    SETTINGS,
    Fleet,
    Postgres,
    Redis,
    add_users,
    approvals,
    audit_missing,
    free_port,
    kill_sandboxes,
    read_back,
    sandbox_ids,
    warm_up,
)
from bench.load_traffic import Record, first_errors, load, phase_row, recovery  # noqa: E402
from gateway.call_audit import arguments_hash  # noqa: E402
from sandbox.gvisor import choose  # noqa: E402

FAULT_AT = (0.08, 0.24, 0.40, 0.56, 0.70)


def environment() -> str:
    runsc = choose().runsc
    version = subprocess.run([runsc, "--version"], capture_output=True, text=True).stdout.splitlines()
    return (f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB, load average "
            f"{os.getloadavg()[0]:.1f} at start; {version[0] if version else runsc}; Python {sys.version.split()[0]}")


def faults(fleet: Fleet, pg: Postgres, redis: Redis, victim: str, ids: list[str], started: float, seconds: float,
           log: list[tuple[str, float]]) -> None:
    """Runs in a thread while the load runs: each fault at its time, noted (name, monotonic time)."""
    def at(fraction: float) -> None:
        time.sleep(max(0.0, started + fraction * seconds - time.monotonic()))

    at(FAULT_AT[0])
    holder = fleet.holder()
    standby = next(c for c in fleet.children() if holder is None or c.pid != holder.pid)
    log.append(("kill a standby replica (SIGKILL)", time.monotonic()))
    standby.send_signal(signal.SIGKILL)
    at(FAULT_AT[1])
    holder = fleet.holder()
    log.append((f"kill the lease holder replica (SIGKILL){'' if holder else ' - none found'}", time.monotonic()))
    if holder:
        holder.send_signal(signal.SIGKILL)
    at(FAULT_AT[2])
    log.append(("restart PostgreSQL (3 s down)", time.monotonic()))
    pg.stop()
    time.sleep(3)
    pg.start()
    at(FAULT_AT[3])
    log.append(("stop Redis (5 s down), start it", time.monotonic()))
    redis.stop()
    time.sleep(5)
    redis.start()
    at(FAULT_AT[4])
    log.append((f"kill {victim}'s sandbox (runsc kill){'' if ids else ' - none found'}", time.monotonic()))
    kill_sandboxes(fleet, ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=180, help="length of each phase")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    if args.replicas < 2:
        raise SystemExit("--replicas must be at least 2 (one fault kills a standby)")
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed: scripts/setup.sh test installs it")
    print(f"Environment: {environment()}")
    print(f"Run: {args.clients} clients of {args.users} users, {args.seconds} s per phase, {args.replicas} replicas, "
          "mixed workspace write_file / read_file / list_dir, loopback", flush=True)

    work = Path(tempfile.mkdtemp(prefix="mcpfleet-load-"))
    redis = Redis(work)
    fleet: Fleet | None = None
    try:
        redis.start()
        pg = Postgres(work / "pg")
        # Every user's sandbox may run at once: the node's cap (50 by default) would otherwise
        # hibernate and resume sandboxes all through the phases, which is a measure of its own.
        running = {"MCPFLEET_MAX_RUNNING": str(max(50, args.users + 10))}
        env = {**os.environ, **SETTINGS, **running, "MCPFLEET_HOME": str(work / "fleet"), "MCPFLEET_PORT": str(free_port()),
               "DATABASE_URL": pg.url, "REDIS_URL": redis.url}
        fleet = Fleet(work / "fleet", env, args.replicas)
        fleet.up()
        keys = add_users(fleet, args.users)
        before = approvals(pg.url)
        # Each user's sandbox started before the clock runs: the phases measure serving, not cold starts.
        warm_started = time.monotonic()
        asyncio.run(warm_up(fleet, keys))
        memory = psutil.virtual_memory()
        print(f"{args.users} sandboxes up in {time.monotonic() - warm_started:.0f} s; host memory in use "
              f"{(memory.total - memory.available) / 2**30:.1f} of {memory.total / 2**30:.1f} GiB", flush=True)
        warm = Record()

        plain, plain_started = Record(), time.monotonic()
        asyncio.run(load(fleet.url, keys, args.clients, args.seconds, plain, "plain"))
        print(f"plain phase done: {len(plain.calls)} calls", flush=True)

        faulted, log = Record(), []
        import threading

        victim = sorted(keys)[0]
        # The victim's sandbox is looked up before the load: under load the CLI can take minutes, and
        # the kill must come on time (a standby that takes the lease adopts the sandboxes, ids and all).
        ids = sandbox_ids(fleet, victim)
        started = time.monotonic()
        thread = threading.Thread(target=faults, args=(fleet, pg, redis, victim, ids, started, args.seconds, log))
        thread.start()
        asyncio.run(load(fleet.url, keys, args.clients, args.seconds, faulted, "faults"))
        thread.join()
        faulted_seconds = time.monotonic() - started

        print("\n| phase | calls | errors | p50 ms | p95 ms | p99 ms | calls/s (ok) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(phase_row("plain", plain.calls, args.seconds))
        print(phase_row("with faults", faulted.calls, faulted_seconds))
        print("\n| fault (at s) | failed calls in its window | s to recover |")
        print("|---|---:|---:|")
        ends = [t for _, t in log[1:]] + [started + faulted_seconds + 60]
        for (name, at), end in zip(log, ends, strict=True):
            affected = [c for c in faulted.calls if c.user == victim] if "sandbox" in name else faulted.calls
            failed, recovered = recovery(affected, at, end)
            print(f"| {name} ({at - started:.0f}) | {failed} | {recovered} |")
        for line in first_errors(plain.calls + faulted.calls):
            print(f"  error seen: {line}")

        record = Record(plain.calls + faulted.calls + warm.calls)
        for part in (warm, plain, faulted):
            for user, files in part.written.items():
                record.written.setdefault(user, {}).update(files)
        unaudited = audit_missing(fleet, record)
        missing = sum(unaudited.values())
        by_tool = Counter()
        for (tool, _), n in unaudited.items():
            by_tool[tool] += n
        if by_tool:
            print(f"  successful calls with no ok audit entry, by tool: {dict(by_tool)}")
        for name, part, t0 in (("plain", plain, plain_started), ("faults", faulted, started)):
            # Writes only: their arguments are unique, so each unaudited one is placed in time exactly.
            times = sorted(c.ended - t0 for c in part.calls if c.ok and c.tool == "workspace__write_file"
                           and (c.tool, arguments_hash(c.arguments)) in unaudited)
            if times:
                print(f"  unaudited successful writes of the {name} phase ended between {times[0]:.1f} and "
                      f"{times[-1]:.1f} s")
        verify = fleet.cli("audit", "verify", check=False)
        lost_files = asyncio.run(read_back(fleet, keys, record.written))
        after = approvals(pg.url)
        successes = sum(1 for c in record.calls if c.ok)
        files = sum(len(f) for f in record.written.values())
        print("\n| check | result |")
        print("|---|---|")
        print(f"| successful calls with their ok tool.call audit entry | {successes - missing} of {successes} |")
        print(f"| `mcpfleet audit verify` | {'ok' if verify.returncode == 0 else 'FAILED: ' + verify.stdout[-200:]} |")
        print(f"| files written by successful calls read back | {files - len(lost_files)} of {files} |")
        print(f"| approvals unchanged | {'yes' if after == before else 'NO'} ({len(after)} rows) |")
        for line in lost_files[:5]:
            print(f"  lost: {line}")
        bad = (any(not c.ok for c in plain.calls) or missing or verify.returncode != 0 or lost_files
               or after != before)
        print("\nFAILED: plain-phase errors or something lost" if bad else "\nOK: no plain-phase error, nothing lost")
        return 1 if bad else 0
    finally:
        if fleet:
            fleet.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
