"""What the model router adds to an ask: first-token latency and tokens/s through the router (quota check,
usage row, audit entry) against the same llama-server asked directly over its OpenAI API.

The local model server (llama-server, Gemma 3 270M, 2 threads) is started as the fleet starts it; the
database is a fresh one of the embedded PostgreSQL in a temporary directory. Each run streams one answer of
`--tokens` tokens at temperature 0 to the same prompt, alternating direct and routed asks so that the
machine's load falls on both alike. Any error fails the bench (exit 1); it never reports a partial table.

    .venv/bin/python bench/models.py [--runs 20] [--tokens 64]
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

from core import accounts
from core.db import migrate, open_pool, start_embedded
from core.models.api import Asker, ChatAsk, ChatDelta
from core.models.local import LocalProvider
from core.models.openai import OpenAIProvider
from core.models.router import Router

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


async def timed(stream) -> tuple[float, float, int]:
    """(seconds to the first piece, tokens/s after it, tokens out) of one streamed answer."""
    started = time.perf_counter()
    first: float | None = None
    last: ChatDelta | None = None
    async for delta in stream:
        if first is None and delta.content:
            first = time.perf_counter()
        last = delta
    ended = time.perf_counter()
    if first is None or last is None or last.answer is None or last.answer.tokens_out < 2:
        raise RuntimeError(f"an answer without pieces or tokens: {last!r}")
    tokens = last.answer.tokens_out
    return first - started, (tokens - 1) / max(ended - first, 1e-9), tokens


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


async def main(runs: int, tokens: int) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        url = start_embedded(Path(tmp) / "pg")
        migrate(url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            user = await accounts.add_user(conn, "bench")
        pool = await open_pool(url)
        local = LocalProvider(Path(tmp) / "log")
        router = Router([local], pool)
        await router.start()
        try:
            await local.wait_ready(300)
            direct = OpenAIProvider(local.base_url or "", name="direct")
            asker = Asker(user.user_id, user.tenant, "tool", "bench")
            ask = ChatAsk(messages=PROMPT, max_tokens=tokens, temperature=0)
            model = (await router.route(None))[1]
            await timed(direct.chat_stream(ask, model))  # warm-up: the prompt's cache, the first allocation
            results: dict[str, list[tuple[float, float, int]]] = {"direct": [], "router": []}
            for _ in range(runs):
                results["direct"].append(await timed(direct.chat_stream(ask, model)))
                results["router"].append(await timed(router.chat_stream(asker, ask)))
            await direct.close()
        finally:
            await router.close()
            await pool.close()
    print(f"model {model} on llama-server ({local.threads} threads), {runs} runs of {tokens} tokens each, streamed\n")
    print(f"{'path':8} {'first token ms (median / p99)':>30} {'tokens/s (median / p99 low)':>30}")
    rows = {}
    for path, measured in results.items():
        firsts = [m[0] * 1000 for m in measured]
        rates = [m[1] for m in measured]
        rows[path] = (statistics.median(firsts), statistics.median(rates))
        low = sorted(rates)[max(0, round(0.01 * (len(rates) - 1)))]
        print(f"{path:8} {statistics.median(firsts):17.1f} / {p99(firsts):8.1f} {statistics.median(rates):19.1f} / {low:8.1f}")
    ratio_first = rows["router"][0] / rows["direct"][0]
    ratio_rate = rows["router"][1] / rows["direct"][1]
    print(f"\nrouter / direct: first token x{ratio_first:.2f}, tokens/s x{ratio_rate:.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()
    try:
        sys.exit(asyncio.run(main(options.runs, options.tokens)))
    except Exception as exc:
        print(f"bench/models.py: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
