"""What the rug-pull guard adds to a tools/list: hashing every live definition against its pin.

Measured in-process on synthetic catalogs (the guard's own cost, no network, no sandbox):
the baseline is encoding the listing as JSON, which answering any tools/list does anyway; "first listing" hashes every tool (a server's
listing changed, or a new sandbox); "cached" is every later listing of the same offers.

    .venv/bin/python bench/registry_guard.py [--tools 10,50,200] [--runs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from registry.definitions import pins_of
from registry.service import Registry
from registry.store import Approved


def catalog(n: int) -> dict[str, Any]:
    tools = [
        {
            "name": f"tool_{i}",
            "description": f"Does thing number {i} with the given input and returns a short report of what it did.",
            "inputSchema": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "A path in the workspace"}, "limit": {"type": "integer"}},
                "required": ["path"],
            },
            "annotations": {"readOnlyHint": True},
        }
        for i in range(n)
    ]
    return {"bench": {"state": "ready", "tools": tools}}


class _Registry(Registry):
    """The real guard, with the user's approval given instead of read from the database."""

    def __init__(self, grant: Approved):
        self._approved = {1: [grant]}
        self._guarded = {}
        self._drift_seen = set()
        self._recorded_builtins = set()
        self._tasks = set()


async def measure(n: int, runs: int) -> tuple[float, float, float]:
    offers = catalog(n)
    grant = Approved("io.bench/bench", "bench", "1.0.0", 1, False, "0" * 64, pins_of(offers["bench"]["tools"]))
    registry = _Registry(grant)
    baseline, first, cached = [], [], []
    for _ in range(runs):
        started = time.perf_counter()
        json.dumps(offers["bench"]["tools"])
        baseline.append(time.perf_counter() - started)
        registry._guarded.clear()
        started = time.perf_counter()
        out = await registry.guard(1, offers)
        first.append(time.perf_counter() - started)
        started = time.perf_counter()
        await registry.guard(1, offers)
        cached.append(time.perf_counter() - started)
        assert len(out["bench"]["tools"]) == n
    return statistics.median(baseline), statistics.median(first), statistics.median(cached)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tools", default="10,50,200")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"{'tools':>6} {'baseline µs':>12} {'first listing µs':>17} {'cached µs':>10} {'first/baseline':>15} {'cached/baseline':>16}")
    for n in (int(x) for x in args.tools.split(",")):
        base, first, cached = asyncio.run(measure(n, args.runs))
        print(f"{n:>6} {base * 1e6:>12.1f} {first * 1e6:>17.1f} {cached * 1e6:>10.1f} {first / base:>14.2f}× {cached / base:>15.3f}×")


if __name__ == "__main__":
    main()
