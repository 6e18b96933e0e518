"""Bearer authentication of every request to the gateway.

The SDK's `BearerAuthBackend` calls `BearerVerifier.verify_token`: API keys
go to `ApiKeyVerifier`, anything else to the OAuth verifier (JWTs of trusted
issuers, gateway/oauth). The resulting `FleetToken` names the principal, which
the SDK's session manager also uses to bind each `Mcp-Session-Id` to the
identity that opened it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken, TokenVerifier
from starlette.types import Scope

from core import accounts
from core.accounts import Identity
from core.db import follow_notifications
from core.tasks import Tasks

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger(__name__)

# A verified key is trusted for this long without asking the database again;
# revocations also clear the cache at once through LISTEN/NOTIFY.
CACHE_SECONDS = 30.0
ISSUER = "mcpfleet:api-key"


class FleetToken(AccessToken):
    """An access token together with the fleet identity it was verified to belong to."""

    identity: Identity


class BearerVerifier:
    def __init__(self, api_keys: ApiKeyVerifier, oauth: TokenVerifier):
        self.api_keys = api_keys
        self.oauth = oauth

    async def verify_token(self, token: str) -> AccessToken | None:
        if token.startswith(accounts.KEY_PREFIX):
            return await self.api_keys.verify_token(token)
        return await self.oauth.verify_token(token)


def is_api_key(token: AccessToken) -> bool:
    return (token.claims or {}).get("iss") == ISSUER


class ApiKeyVerifier:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self._cache: dict[bytes, tuple[float, Identity]] = {}
        self._tasks = Tasks()

    async def verify_token(self, token: str) -> AccessToken | None:
        identity = await self.identify(token)
        if identity is None:
            return None
        return FleetToken(
            token=token,
            client_id=identity.principal,
            scopes=[identity.role],
            subject=str(identity.user_id),
            claims={"iss": ISSUER, "tenant": identity.tenant, "user": identity.user, "role": identity.role},
            identity=identity,
        )

    async def identify(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self.fleet.pool.connection() as conn:
            verified = await accounts.verify_key_until(conn, token)
        if verified is None:
            self._cache.pop(digest, None)
            return None
        identity, expires_at = verified
        if len(self._cache) > 10_000:
            self._cache.clear()
        trusted_for = CACHE_SECONDS
        if expires_at is not None:  # an expiring key is not trusted past its expiry
            trusted_for = min(trusted_for, (expires_at - datetime.now(UTC)).total_seconds())
        self._cache[digest] = (now + trusted_for, identity)
        return identity

    def start_listening(self, url: str) -> None:
        listen = follow_notifications(url, "api_keys_revoked", self._cache.clear, "revocation")
        self._tasks.spawn(listen, name="api-key-revocations")

    async def stop_listening(self) -> None:
        await self._tasks.close()


def identity_of(scope: Scope | None) -> Identity | None:
    """The identity the auth middleware put on this request, if any."""
    if scope is None:
        return None
    user = scope.get("user")
    if not isinstance(user, AuthenticatedUser) or not isinstance(user.access_token, FleetToken):
        return None
    return user.access_token.identity
