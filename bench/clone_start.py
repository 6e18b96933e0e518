"""Cold start booted against cold start cloned from a template (`sandbox.templates`), on real runsc.

Each run takes a new user (empty pool) through `ensure` and the first tool result
(`workspace__list_dir`; cold start = `ensure` + that call, the pause between left out), once with
the sandbox booted (the baseline) and once cloned from the tier's template, alternating, in one
fleet home, reading each sandbox's memory (PSS of its runsc processes) fresh and after its first
result. Prints medians and p99 with ratios against the booted start.

    .venv/bin/python bench/clone_start.py [--runs 10] [--timeout 900]

Everything lives in a temporary home under /tmp with its own runsc root, cgroup parent and
embedded PostgreSQL, removed at the end. A start or call that fails ends the bench with an error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedded_home import home_manager, run_in_home  # beside this script
from fresh_memory import sandbox_pids  # beside this script
from lifecycle_report import MiB, row  # beside this script
from sandbox_lifecycle import first_result  # beside this script

from core.accounts import add_user
from sandbox import tiers
from sandbox.backends.runsc import RunscBackend
from sandbox.layout import tree_bytes
from sandbox.manager import SandboxManager
from sandbox.memory import pss_bytes
from sandbox.templates import Templates

TENANT = "clones"
IDLE_SETTLE_S = 2.0


async def start_one(manager: SandboxManager, name: str, templates: Templates | None) -> dict[str, float]:
    """A new user's sandbox, booted (`templates` None) or cloned: ms to `ensure`, ms from `ensure`
    to the first result (the first call, after a pause to read its fresh memory), PSS in MiB fresh
    and after its first result, and when its supervisor started (one time for every clone)."""
    async with manager.pool.connection() as conn:
        user = (await add_user(conn, name, tenant=TENANT)).user_id
    manager.templates = templates
    backend = manager.backend
    assert isinstance(backend, RunscBackend)
    started = time.perf_counter()
    sandbox = await manager.ensure(user, TENANT, name)
    ensure_ms = (time.perf_counter() - started) * 1e3
    await asyncio.sleep(IDLE_SETTLE_S)
    fresh = pss_bytes(sandbox_pids(backend, sandbox.id)) / MiB
    started = time.perf_counter()
    await first_result(sandbox)
    first_ms = (time.perf_counter() - started) * 1e3
    await asyncio.sleep(IDLE_SETTLE_S)
    used = pss_bytes(sandbox_pids(backend, sandbox.id)) / MiB
    await manager.reclaim(user)
    return {"ensure": ensure_ms, "first": ensure_ms + first_ms, "fresh": fresh, "pss": used,
            "born": float(sandbox.client.supervisor["started_at"])}


async def bench(home: Path, url: str, runs: int) -> None:
    booted: dict[str, list[float]] = {"ensure": [], "first": [], "fresh": [], "pss": []}
    cloned: dict[str, list[float]] = {"ensure": [], "first": [], "fresh": [], "pss": []}
    async with home_manager(home, url, "clones", TENANT) as (manager, backend):
        async with manager.pool.connection() as conn:
            tier = await tiers.get(conn, tiers.DEFAULT_TIER)
        started = time.perf_counter()
        await manager.start()
        templates = manager.templates
        if templates is None or not await templates.wait(tier):
            raise RuntimeError("the template was not built: see the log above")
        template = templates.template(tier)
        assert template is not None
        print(f"runsc {backend.gvisor.release} on {backend.platform}; template built in {time.perf_counter() - started:.2f} s, "
              f"image {tree_bytes(template.image) / MiB:.1f} MiB\n")
        births: dict[str, set[float]] = {"boot": set(), "clone": set()}
        for i in range(runs):
            for kind, into, using in (("boot", booted, None), ("clone", cloned, templates)):
                measured = await start_one(manager, f"{kind}{i}", using)
                for key, values in into.items():
                    values.append(measured[key])
                births[kind].add(measured["born"])
        manager.templates = templates  # closed with the manager
        if templates.template(tier) is not template or len(births["clone"]) != 1:
            raise RuntimeError("a clone failed during the bench and booted instead: see the log above")
        if len(births["boot"]) != runs:
            raise RuntimeError("a booted start was a clone")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| measure | median | p99 | n | target | × booted |")
    print("|---|---:|---:|---:|---|---:|")
    for key, what, unit, target in (
        ("ensure", "new user's `ensure`", "ms", ""),
        ("first", "cold start → first tool result (`ensure` + first call)", "ms", "≤ 500 ms"),
        ("fresh", "fresh sandbox idle before its first call, PSS", "MiB", "≤ 38.1 MiB"),
        ("pss", "sandbox idle after its first result, PSS", "MiB", ""),
    ):
        base = statistics.median(booted[key])
        print(row(f"{what}, booted", booted[key], unit, target, base))
        print(row(f"{what}, cloned", cloned[key], unit, target, base))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--runs", type=int, default=10, help="new users per kind of start (default 10)")
    cli.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    args = cli.parse_args()
    run_in_home("cs-", lambda home, url: bench(home, url, args.runs), args.timeout)
