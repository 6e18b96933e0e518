"""The egress rate limit is one per user across gateways when they share a Redis (`REDIS_URL`), as
the other limits are: two `SandboxEgress`, each with the buckets its gateway's settings give it
(`gateway.limits.buckets_for`, what `gateway.fleet` hands it), against one real redis-server.

The names asked for resolve to nothing (no DNS involved): a connection the limit lets through is
refused afterwards for that (502), one over the limit before anything else (429).
"""

from __future__ import annotations

import socket

from core.settings import load_settings
from gateway.call_audit import CallAudit
from gateway.egress import SandboxEgress
from gateway.limits import buckets_for
from gateway.ratelimit_redis import RedisBuckets
from sandbox.client import SupervisorClient
from sandbox.running import Sandbox
from sandbox.servers import ServerSpec
from sandbox.tunnels import EgressRefused
from tests.test_limits import redis_server  # noqa: F401  (a fixture)

HOST = "api.limits-test.example"


async def nowhere(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def sandbox_of(user_id: int) -> Sandbox:
    spec = ServerSpec("fetcher", ("python", "-m", "x"), egress=(HOST,))
    return Sandbox(id=f"sbx-limits-{user_id}", user_id=user_id, tenant="t", user=f"u{user_id}", tier=None,  # type: ignore[arg-type]
                   client=SupervisorClient(), layout=None, created_at=None, servers=(spec,))  # type: ignore[arg-type]


async def status_of(egress: SandboxEgress, sandbox: Sandbox) -> int:
    try:
        await egress.open(sandbox, "fetcher", HOST, 443)
    except EgressRefused as exc:
        return exc.status
    raise AssertionError("a name that resolves to nothing was connected to")


async def test_the_egress_limit_holds_across_gateways_sharing_redis(redis_server):  # noqa: F811
    settings = load_settings(redis_url=redis_server.url)
    gateways = [SandboxEgress(CallAudit(), resolver=nowhere, buckets=buckets_for(settings), per_min=3) for _ in range(2)]
    assert all(isinstance(g.buckets, RedisBuckets) for g in gateways)
    try:
        alice, bob = sandbox_of(901), sandbox_of(902)
        # Alice's connections alternate between the gateways: three in all, then the fourth is over.
        statuses = [await status_of(gateways[i % 2], alice) for i in range(5)]
        assert statuses == [502, 502, 502, 429, 429]
        assert await status_of(gateways[0], bob) == 502  # bob's bucket is his own
    finally:
        for g in gateways:
            await g.buckets.aclose()


async def test_without_redis_each_gateway_counts_alone():
    settings = load_settings(redis_url=None)
    gateways = [SandboxEgress(CallAudit(), resolver=nowhere, buckets=buckets_for(settings), per_min=3) for _ in range(2)]
    alice = sandbox_of(903)
    statuses = [await status_of(gateways[i % 2], alice) for i in range(6)]
    assert statuses == [502] * 6  # three each
    assert await status_of(gateways[0], alice) == 429
