"""Token buckets: in this process, or shared by every gateway through Redis.

A bucket holds up to `per_min` tokens and refills at `per_min / 60` per second. `take` removes one
token and returns 0, or, when the bucket is empty, how many seconds until one is back.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from core.optional import require

log = logging.getLogger(__name__)


class Buckets(Protocol):
    async def take(self, key: str, per_min: int) -> float: ...

    async def aclose(self) -> None: ...


def _refill(tokens: float, elapsed: float, per_min: int) -> float:
    return min(float(per_min), tokens + max(0.0, elapsed) * per_min / 60)


class LocalBuckets:
    """Buckets of this process alone: with several gateways, each enforces the limit on its own.

    A bucket left alone for a minute is full again and carries no state worth keeping: such buckets
    are swept every `SWEEP_EVERY_S`, so memory follows the keys in use, not every key ever sent.
    Beyond `MAX_KEYS` even so, the least recently used go first.
    """

    MAX_KEYS = 50_000
    SWEEP_EVERY_S = 10.0

    def __init__(self) -> None:
        # key -> (tokens, when, per_min); ordered from least to most recently used
        self._buckets: dict[str, tuple[float, float, int]] = {}
        self._swept_at = time.monotonic()

    def __len__(self) -> int:
        return len(self._buckets)

    async def take(self, key: str, per_min: int) -> float:
        now = time.monotonic()
        if now - self._swept_at >= self.SWEEP_EVERY_S:
            self._sweep(now)
        tokens, at, _ = self._buckets.pop(key, (float(per_min), now, per_min))
        tokens = _refill(tokens, now - at, per_min)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) * 60 / per_min
        self._buckets[key] = (tokens, now, per_min)
        while len(self._buckets) > self.MAX_KEYS:
            del self._buckets[next(iter(self._buckets))]
        return wait

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        full = [k for k, (t, a, per_min) in self._buckets.items() if _refill(t, now - a, per_min) >= per_min]
        for k in full:
            del self._buckets[k]

    async def aclose(self) -> None:
        pass


# One round trip, atomic: read, refill, take, write. Redis's own clock, so that gateways whose
# clocks differ agree on the refill. The key expires once the bucket would be full again anyway.
TAKE = """
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return tostring(wait)
"""

WARN_EVERY_S = 30.0


class RedisBuckets:
    """Buckets shared through Redis (`REDIS_URL`), so that the limits hold across gateways.

    Redis unreachable or failing: the request is let through (fail open) and a warning logged at
    most every `WARN_EVERY_S`. A limit that cannot be checked must not take the gateway down with it.
    """

    PREFIX = "mcpfleet:bucket:"

    def __init__(self, url: str) -> None:
        feature = "REDIS_URL (rate limits shared by the gateways)"
        aioredis = require("redis.asyncio", extra="redis", feature=feature)
        redis_errors = require("redis.exceptions", extra="redis", feature=feature)
        self._errors: tuple[type[BaseException], ...] = (redis_errors.RedisError, OSError)
        # Short timeouts: every request waits on this, and an unreachable Redis must cost little.
        self._redis = aioredis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        self._take = self._redis.register_script(TAKE)  # EVALSHA, loading the script when Redis lacks it
        self._warned_at = -WARN_EVERY_S

    async def take(self, key: str, per_min: int) -> float:
        try:
            return float(await self._take(keys=[self.PREFIX + key], args=[per_min]))
        except self._errors as exc:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("rate limits not enforced: Redis unavailable (%s)", type(exc).__name__)
            return 0.0

    async def aclose(self) -> None:
        await self._redis.aclose()
