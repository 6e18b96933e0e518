"""What the audit chain costs: one append on an autocommit connection, against the same insert into
a copy of the table without the chain's trigger, and how fast `verify` walks the result.

Runs on a fresh database of the embedded PostgreSQL (in a temporary directory), one connection,
after a warm-up. Prints median and p99 per insert in µs, and entries verified per second.

    .venv/bin/python bench/audit_append.py [--appends 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import audit
from core.db import migrate, start_embedded

DETAIL = {"arguments_sha256": "ab" * 32, "ms": 12.5}
PLAIN_INSERT = """INSERT INTO plain_entries (tenant, actor, action, target, outcome, detail)
                  VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"""


async def timed(n: int, calls: list) -> list[list[float]]:
    """Per-call µs of each of `calls`, taken in turns so that a load that comes and goes hits all alike."""
    for _ in range(50):
        for call in calls:
            await call()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(n):
        for call, into in zip(calls, samples, strict=True):
            start = time.perf_counter_ns()
            await call()
            into.append((time.perf_counter_ns() - start) / 1000)
    return [sorted(s) for s in samples]


async def main(url: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        # The table as it was before the chain: a sequence for the id, now() for the time.
        await conn.execute(
            """CREATE TABLE plain_entries (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), tenant text,
                 actor text, action text NOT NULL, target text, outcome text NOT NULL, detail jsonb NOT NULL);
               CREATE INDEX ON plain_entries (at)"""
        )

        async def chained() -> None:
            await audit.append(
                conn,
                action="tool.call",
                outcome="ok",
                tenant="acme",
                actor="acme/alice",
                target="workspace__read_file",
                detail=DETAIL,
            )

        async def plain() -> None:
            args = ("acme", "acme/alice", "tool.call", "workspace__read_file", "ok", Jsonb(DETAIL))
            await (await conn.execute(PLAIN_INSERT, args)).fetchone()

        names = ["audit.append (chained)", "same insert, no chain"]
        rows = [
            (name, statistics.median(s), s[int(len(s) * 0.99) - 1])
            for name, s in zip(names, await timed(n, [chained, plain]), strict=True)
        ]
        entries = (await audit.head(conn)).last_id
        start = time.perf_counter()
        assert await audit.verify(conn) is None
        verify_rate = entries / (time.perf_counter() - start)

    print(f"{'':28}{'p50 µs':>10}{'p99 µs':>10}")
    for name, p50, p99 in rows:
        print(f"{name:28}{p50:10.0f}{p99:10.0f}")
    print(f"verify: {entries} entries at {verify_rate:,.0f} entries/s")


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--appends", type=int, default=1000)
    args = cli.parse_args()
    with tempfile.TemporaryDirectory() as home:
        url = start_embedded(Path(home) / "postgres")
        migrate(url)
        asyncio.run(main(url, args.appends))
