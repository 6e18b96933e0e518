"""Verifying a bearer JWT: a trusted issuer, its signature, its lifetime, this gateway as audience.

The unverified token is read only to find its issuer among the trusted ones
and the key id; nothing is fetched from a URL the token names. The user it
maps to is chosen by the issuer's tenant, never by anything in the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg
from joserfc import jws, jwt
from joserfc.errors import JoseError

from core.accounts import AccountError, Identity
from core.db import follow_notifications
from core.settings import Settings
from core.tasks import Tasks
from core.text import bounded
from gateway.auth import FleetToken
from gateway.oauth import store
from gateway.oauth.egress import Egress
from gateway.oauth.keys import IssuerKeys, NoKey

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519")
LEEWAY_S = 30
# A verified token is trusted this long (or until it expires) without asking the database again;
# issuer changes clear the cache at once through LISTEN/NOTIFY.
CACHE_SECONDS = 30.0


class InvalidToken(Exception):
    """Why a token was refused; logged, never sent to the client."""


class OAuthVerifier:
    def __init__(
        self, settings: Settings, fleet: Fleet, *, on_refused: Callable[[str, object, object], None] | None = None
    ):
        self.fleet = fleet
        self.resource = settings.public_url
        self.egress = Egress(allow_private=settings.allow_private_issuers)
        self.keys = IssuerKeys(self.egress)
        self._cache: dict[bytes, tuple[float, FleetToken]] = {}
        self._tasks = Tasks()
        # Told why a token was refused (message, issuer, subject), for the audit log.
        self.on_refused = on_refused

    async def verify_token(self, token: str) -> FleetToken | None:
        digest = hashlib.sha256(token.encode()).digest()
        now = time.time()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            verified = await self.verify(token)
        except InvalidToken as exc:
            log.info("refused a bearer token: %s", bounded(str(exc), 1024))  # the message quotes the token's claims
            if self.on_refused is not None:
                self.on_refused(str(exc), *_issuer_and_subject(token))
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (min(now + CACHE_SECONDS, verified.expires_at or now), verified)
        return verified

    async def verify(self, token: str) -> FleetToken:
        try:
            unverified = jws.extract_compact(token.encode())
            claims = json.loads(unverified.payload)
        except (JoseError, ValueError) as exc:
            raise InvalidToken(f"not a signed JWT ({exc})") from None
        header = unverified.protected
        issuer_url = claims.get("iss") if isinstance(claims, dict) else None
        if not isinstance(issuer_url, str):
            raise InvalidToken("no issuer")
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken(f"algorithm {header.get('alg')!r} is not accepted")
        async with self.fleet.pool.connection() as conn:
            issuer = await store.find_issuer(conn, issuer_url)
        if issuer is None:
            raise InvalidToken(f"issuer {bounded(issuer_url)!r} is not trusted")

        kid = header.get("kid")
        try:
            key = await self.keys.key_for(issuer, kid if isinstance(kid, str) else None, header["alg"])
            verified = jwt.decode(token, key, algorithms=[header["alg"]])
        except NoKey as exc:
            raise InvalidToken(str(exc)) from None
        except JoseError as exc:
            raise InvalidToken(f"signature: {exc}") from None
        claims = verified.claims
        try:
            jwt.JWTClaimsRegistry(
                leeway=LEEWAY_S,
                iss={"essential": True, "value": issuer.url},
                sub={"essential": True},
                exp={"essential": True},
            ).validate(claims)
        except JoseError as exc:
            raise InvalidToken(f"claims: {exc}") from None
        audience = issuer.audience or self.resource
        if not _names(claims.get("aud"), audience):
            raise InvalidToken(f"audience {claims.get('aud')!r} does not include {audience}")

        try:
            async with self.fleet.pool.connection() as conn:
                identity = await store.user_for_subject(conn, issuer, claims["sub"], claims)
        except (AccountError, psycopg.Error) as exc:
            raise InvalidToken(f"cannot provision {bounded(str(claims['sub']))!r} of {issuer.url}: {exc}") from None
        return token_for(identity, token, issuer.url, claims, self.resource)

    def start_listening(self, url: str) -> None:
        self._tasks.spawn(follow_notifications(url, store.CHANNEL, self._forget, "issuer-change"), name="issuer-changes")

    async def close(self) -> None:
        await self._tasks.close()
        await self.egress.aclose()

    def _forget(self) -> None:
        self._cache.clear()
        self.keys.forget()


def token_for(identity: Identity, token: str, issuer: str, claims: dict, resource: str) -> FleetToken:
    return FleetToken(
        token=token,
        client_id=identity.principal,
        scopes=scopes_of(claims),
        expires_at=int(claims["exp"]),
        resource=resource,
        # Only what we established: nothing the token says is passed on as a claim of ours.
        subject=str(identity.user_id),
        claims={"iss": issuer, "sub": claims["sub"]},
        identity=identity,
    )


def scopes_of(claims: dict) -> list[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return scope.split()
    scp = claims.get("scp")  # some issuers send a list under this name
    if isinstance(scp, list):
        return [s for s in scp if isinstance(s, str)]
    return []


def _names(aud: object, audience: str) -> bool:
    """Whether `aud` (a string or a list) names `audience`, a trailing slash aside."""
    wanted = audience.rstrip("/")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return any(isinstance(v, str) and v.rstrip("/") == wanted for v in values)


def _issuer_and_subject(token: str) -> tuple[object, object]:
    """Who a refused token claims to be, unverified: for the audit log, which never holds the token."""
    try:
        claims = json.loads(jws.extract_compact(token.encode()).payload)
    except (JoseError, ValueError):
        return None, None
    return (claims.get("iss"), claims.get("sub")) if isinstance(claims, dict) else (None, None)
