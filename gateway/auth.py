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
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken, TokenVerifier
from starlette.types import Scope

from core import accounts
from core.accounts import Identity
from core.db import follow_notifications
from core.outage import OutageCache
from core.tasks import Tasks

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger(__name__)

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
        # A verified key is trusted for `key_cache_s` without asking the database again; revocations
        # also clear the cache at once through LISTEN/NOTIFY. While the database cannot be reached,
        # a key verified in the last `db_outage_s` keeps working (core.outage), and no other.
        settings = fleet.settings
        self.cache: OutageCache[bytes, Identity] = OutageCache(
            "Checking this API key", fresh_s=settings.key_cache_s, outage_s=settings.db_outage_s)
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
        """The key's identity, None for a key not (or no longer) valid; `DatabaseUnavailable` when
        the database cannot be reached and the key was not verified recently enough to go on."""
        digest = hashlib.sha256(token.encode()).digest()

        async def load() -> tuple[Identity, float | None] | None:
            async with self.fleet.pool.connection() as conn:
                verified = await accounts.verify_key_until(conn, token)
            if verified is None:
                return None
            identity, expires_at = verified
            # An expiring key is not trusted past its expiry, outage or not.
            return identity, None if expires_at is None else (expires_at - datetime.now(UTC)).total_seconds()

        return await self.cache.get(digest, load)

    def start_listening(self, url: str) -> None:
        # A lost listener keeps the cache for the outage's bound (a revocation cannot be written
        # while the database is down); the cache is cleared when the listener is back.
        listen = follow_notifications(url, "api_keys_revoked", self.cache.clear, "revocation",
                                     keep_for=self.cache.outage_s)
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
