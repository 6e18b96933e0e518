"""What the audit journal adds to a tool call: `record` (one `write()` of a JSON line) and `durable` (the
group fsync the answer waits for), with 1, 10 and 50 calls in flight at once, on the file system of
the given directory (the fleet home's, by default a temporary one). No database: the journal only.

    .venv/bin/python bench/audit_journal.py [--calls 2000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.audit_journal import Journal  # noqa: E402

DETAIL = {"server": "workspace", "args_sha256": "ab" * 32, "latency_ms": 3.2, "version": "1.0.0"}


async def run(directory: Path, calls: int, concurrency: int) -> tuple[list[float], int]:
    journal = Journal(directory)
    journal.open()
    waits: list[float] = []
    syncs = 0
    original = journal._sync

    async def counted() -> None:
        nonlocal syncs
        syncs += 1
        await original()

    journal._sync = counted  # type: ignore[method-assign]  # counts the fsyncs, to show how many calls share one

    async def one_call() -> None:
        started = time.perf_counter()
        journal.append(("default", "default/bench", "tool.call", "workspace__read_file", "ok", DETAIL))
        await journal.durable()
        waits.append((time.perf_counter() - started) * 1e6)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one_call()

    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    journal.close(all_written=True)
    return waits, syncs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"journal on {tmp}; µs added per call (write + group fsync)")
        for concurrency in (1, 10, 50):
            waits, syncs = asyncio.run(run(Path(tmp), args.calls, concurrency))
            waits.sort()
            print(f"{concurrency:3d} in flight: p50 {statistics.median(waits):8.0f}  p99 {waits[int(len(waits) * 0.99)]:8.0f}"
                  f"  calls per fsync {len(waits) / max(syncs, 1):5.1f}")


if __name__ == "__main__":
    main()
