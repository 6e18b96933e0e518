"""Bearer authentication of every request to the gateway.

The SDK's `BearerAuthBackend` calls `ApiKeyVerifier.verify_token`; the
resulting `AccessToken` names the principal, which the SDK's session manager
also uses to bind each `Mcp-Session-Id` to the identity that opened it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import psycopg
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from psycopg_pool import AsyncConnectionPool
from starlette.types import Scope

from gateway import accounts
from gateway.accounts import Identity

log = logging.getLogger(__name__)

# A verified key is trusted for this long without asking the database again;
# revocations also clear the cache at once through LISTEN/NOTIFY.
CACHE_SECONDS = 30.0
ISSUER = "mcpfleet:api-key"


class ApiKeyVerifier:
    def __init__(self, pool: AsyncConnectionPool | None = None):
        # The app's lifespan opens the pool after the middleware holding this verifier is built.
        self.pool = pool
        self._cache: dict[bytes, tuple[float, Identity]] = {}
        self._listener: asyncio.Task[None] | None = None

    async def verify_token(self, token: str) -> AccessToken | None:
        identity = await self.identify(token)
        if identity is None:
            return None
        return AccessToken(
            token=token,
            client_id=identity.principal,
            scopes=[identity.role],
            subject=str(identity.user_id),
            claims={"iss": ISSUER, "tenant": identity.tenant, "user": identity.user, "role": identity.role},
        )

    async def identify(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        if self.pool is None:
            return None
        async with self.pool.connection() as conn:
            identity = await accounts.verify_key(conn, token)
        if identity is None:
            self._cache.pop(digest, None)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + CACHE_SECONDS, identity)
        return identity

    def start_listening(self, url: str) -> None:
        self._listener = asyncio.create_task(self._listen(url), name="api-key-revocations")

    async def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass

    async def _listen(self, url: str) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute("LISTEN api_keys_revoked")
                    # Anything revoked while we were not listening must not stay cached.
                    self._cache.clear()
                    async for _ in conn.notifies():
                        self._cache.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database restarted: keep trying, trust nothing cached
                self._cache.clear()
                log.warning("lost the revocation listener (%s); reconnecting", exc)
                await asyncio.sleep(1.0)


def identity_of(scope: Scope | None) -> Identity | None:
    """The identity the auth middleware put on this request, if any."""
    if scope is None:
        return None
    user = scope.get("user")
    if not isinstance(user, AuthenticatedUser):
        return None
    claims = user.access_token.claims or {}
    if claims.get("iss") != ISSUER:
        return None
    return Identity(
        user_id=int(user.access_token.subject or 0),
        user=claims["user"],
        tenant=claims["tenant"],
        role=claims["role"],
    )
