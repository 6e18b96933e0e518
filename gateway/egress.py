"""Which connections a sandbox's servers may make, made by the gateway (the `EgressPolicy`).

A server reaches the network only through the egress proxy its supervisor offers on the sandbox's
loopback (`sandbox.supervisor.proxy`), relayed over the channel (`sandbox.tunnels`). Here each
connection it asks for is decided and made:

- the host must be one its manifest declares (`host` allows ports 443 and 80; `host:port` that port);
- the gateway resolves the name itself, once; every address it resolves to is vetted (no private,
  loopback, link-local, multicast, reserved or metadata address: `vet_address`) and the connection
  goes to a vetted address, never the name again, so a name that resolves elsewhere a moment later
  (DNS rebinding) gains nothing; an address literal is vetted the same way;
- each user has a bucket of connections per minute;
- every connection, made or refused, is an `egress.connect` audit entry: user, server, host, port,
  the address, bytes up (sent by the server) and down, the outcome and why. Refusals cost the
  sandbox nothing, so a tool could ask for them at the channel's speed: of the refusals of one
  user's server for one host:port and outcome, one is written per `REFUSALS_EVERY_S`, the ones in
  between counted into the next one's `detail.suppressed`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from gateway.call_audit import CallAudit
from gateway.oauth.egress import EgressRefused as AddressRefused
from gateway.oauth.egress import vet_address
from gateway.ratelimit_redis import Buckets, LocalBuckets
from sandbox.tunnels import EgressRefused, Opened, Sandbox

log = logging.getLogger(__name__)

DEFAULT_PORTS = (443, 80)
"""What a declared host without a port allows."""
CONNECT_TIMEOUT_S = 10.0
PER_MIN = 120
"""Connections a user's servers may open per minute, all together."""

REFUSALS_EVERY_S = 10.0
MAX_THROTTLED = 10_000
"""Refusal keys remembered at once; beyond, the oldest are forgotten (their next refusal is written)."""

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The gateway host's resolver; the addresses in the order it gives them."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def pinned_resolver(entries: tuple[str, ...], fallback: Resolver = system_resolver) -> Resolver:
    """Names pinned to addresses (`MCPFLEET_EGRESS_HOSTS`, `name=address` entries, a name repeated
    for several), the rest by `fallback`. The addresses go through the same vetting as DNS's."""
    table: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, address = entry.partition("=")
        if not sep or not name.strip() or not address.strip():
            raise ValueError(f"MCPFLEET_EGRESS_HOSTS entries are name=address, not {entry!r}")
        ipaddress.ip_address(address.strip())  # a name must not be pinned to another name
        table.setdefault(name.strip().lower().rstrip("."), []).append(address.strip())

    async def resolve(host: str, port: int) -> list[str]:
        pinned = table.get(host.lower().rstrip("."))
        return list(pinned) if pinned is not None else await fallback(host, port)

    return resolve


def declared_ports(declared: tuple[str, ...], host: str) -> set[int]:
    """The ports `declared` allows on `host` (names compared without case or a final dot)."""
    ports: set[int] = set()
    for entry in declared:
        name, _, port = entry.lower().rstrip(".").partition(":")
        if name == host:
            ports.update([int(port)] if port else DEFAULT_PORTS)
    return ports


class SandboxEgress:
    def __init__(self, calls: CallAudit, *, resolver: Resolver = system_resolver, buckets: Buckets | None = None,
                 per_min: int = PER_MIN, connect_timeout: float = CONNECT_TIMEOUT_S):
        """`resolver`: how names become addresses (the system's; tests map their own names)."""
        self.calls = calls
        self.resolver = resolver
        self.buckets = buckets or LocalBuckets()
        self.per_min = per_min
        self.connect_timeout = connect_timeout
        # (user, server, target, outcome) -> (when last written, refusals suppressed since)
        self._refusals: dict[tuple[int | None, str, str, str], tuple[float, int]] = {}

    async def open(self, sandbox: Sandbox, server: str, host: str, port: int) -> Opened:
        if sandbox.user_id is None:
            raise EgressRefused("a sandbox nobody holds yet has no egress")
        spec = next((s for s in sandbox.servers or () if s.name == server), None)
        if spec is None or not spec.egress:
            raise EgressRefused(f"server {server!r} declares no egress hosts")
        host = host.lower().rstrip(".")
        if port not in declared_ports(spec.egress, host):
            raise EgressRefused(
                f"{host}:{port} is not among the hosts server {server!r} declares ({', '.join(spec.egress)})"
            )
        wait = await self.buckets.take(f"egress:{sandbox.user_id}", self.per_min)
        if wait > 0:
            raise EgressRefused(f"over {self.per_min} connections a minute; try again in {wait:.0f}s", 429)
        addresses = await self._vetted(host, port)
        problems = []
        for address in addresses:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                problems.append(f"{address}: {exc or type(exc).__name__}")
                continue
            return Opened(reader, writer, address)
        raise EgressRefused(f"cannot connect to {host}:{port} ({'; '.join(problems)})", 502)

    async def _vetted(self, host: str, port: int) -> list[str]:
        """The addresses to try: all of them acceptable, or the connection is refused."""
        try:
            ipaddress.ip_address(host.strip("[]"))
            addresses = [host.strip("[]")]
        except ValueError:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise EgressRefused(f"cannot resolve {host}: {exc}", 502) from None
        if not addresses:
            raise EgressRefused(f"{host} resolves to no address", 502)
        for address in addresses:
            try:
                vet_address(address, allow_private=False, hint=" (not globally routable)")
            except (AddressRefused, ValueError) as exc:
                # One bad answer condemns the name: it is pointed somewhere it must not lead.
                raise EgressRefused(f"{host} resolves to a refused address: {exc}") from None
        return addresses

    def finished(self, sandbox: Sandbox, server: str, host: str, port: int, *, address: str | None,
                 sent: int, received: int, outcome: str, error: str | None) -> None:
        detail = {"server": server, "host": host, "port": port, "address": address, "bytes_up": sent,
                  "bytes_down": received, "sandbox": sandbox.id, "error": error}
        if address is None:
            suppressed = self._throttled((sandbox.user_id, server, f"{host}:{port}", outcome))
            if suppressed is None:
                return
            if suppressed:
                detail["suppressed"] = suppressed
        self.calls.record("egress.connect", outcome, tenant=sandbox.tenant, actor=sandbox.user,
                          target=f"{host}:{port}", detail=detail)
        log.info("egress %s/%s %s -> %s:%d (%s) %s: %d up, %d down%s", sandbox.tenant, sandbox.user, server, host,
                 port, address, outcome, sent, received, f": {error}" if error else "")

    def _throttled(self, key: tuple[int | None, str, str, str]) -> int | None:
        """None: do not write this refusal; else write it, with how many were left unwritten before it."""
        now = time.monotonic()
        written_at, suppressed = self._refusals.pop(key, (float("-inf"), 0))
        if now - written_at < REFUSALS_EVERY_S:
            self._refusals[key] = (written_at, suppressed + 1)
            return None
        self._refusals[key] = (now, 0)
        while len(self._refusals) > MAX_THROTTLED:
            del self._refusals[next(iter(self._refusals))]
        return suppressed
