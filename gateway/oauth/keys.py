"""Each trusted issuer's signing keys: its JWKS, found through its metadata unless configured.

Keys are kept for a while and fetched again when a token names a key id we
do not have (the issuer rotated its keys), but at most once per cool-down per
issuer, so tokens with made-up key ids cannot make the gateway hammer it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from joserfc.jwk import Key, KeySet

from gateway.oauth.egress import Egress, EgressRefused
from gateway.oauth.store import Issuer

log = logging.getLogger(__name__)

# Keys an issuer withdraws stop verifying tokens within this.
MAX_AGE_S = 600.0
# At most one fetch per issuer in this time for unknown key ids, and after a failed fetch.
COOL_DOWN_S = 30.0

# Only public-key algorithms: a shared-secret algorithm would let anyone who has the
# public key (everyone) sign tokens.
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class NoKey(Exception):
    """No key of the issuer's can verify the token; the message says why."""


@dataclass
class _Entry:
    keys: list[Key] = field(default_factory=list)
    fetched_at: float = -math.inf
    unknown_kid_fetch_at: float = -math.inf
    failed_at: float = -math.inf
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class IssuerKeys:
    def __init__(self, egress: Egress):
        self._egress = egress
        self._entries: dict[tuple[str, str | None], _Entry] = {}
        self.fetches = 0

    async def key_for(self, issuer: Issuer, kid: str | None, alg: str) -> Key:
        entry = self._entries.setdefault((issuer.url, issuer.jwks_url), _Entry())
        async with entry.lock:
            now = time.monotonic()
            if now - entry.fetched_at > MAX_AGE_S:
                await self._fetch(issuer, entry, now)
            key = _pick(entry.keys, kid, alg)
            if key is None and now - entry.unknown_kid_fetch_at >= COOL_DOWN_S:
                entry.unknown_kid_fetch_at = now
                await self._fetch(issuer, entry, now)
                key = _pick(entry.keys, kid, alg)
        if key is None:
            raise NoKey(f"no {alg} key with kid {kid!r} in the keys of {issuer.url}")
        return key

    def forget(self) -> None:
        self._entries.clear()

    async def _fetch(self, issuer: Issuer, entry: _Entry, now: float) -> None:
        if now - entry.failed_at < COOL_DOWN_S:
            if entry.keys:
                return  # keep the keys we have until the issuer answers again
            raise NoKey(f"the keys of {issuer.url} could not be fetched a moment ago")
        try:
            self.fetches += 1
            jwks_url = issuer.jwks_url or await self._discover(issuer)
            entry.keys = _public_keys(await self._egress.get_json(jwks_url), jwks_url)
            entry.fetched_at = now
        except EgressRefused as exc:
            entry.failed_at = now
            log.warning("cannot fetch the keys of issuer %s: %s", issuer.url, exc)
            if not entry.keys:
                raise NoKey(str(exc)) from None

    async def _discover(self, issuer: Issuer) -> str:
        problems = []
        for url in metadata_urls(issuer.url):
            try:
                metadata = await self._egress.get_json(url)
            except EgressRefused as exc:
                problems.append(str(exc))
                continue
            # RFC 8414 §3.3: metadata for another issuer must not be used (it could name any keys).
            if metadata.get("issuer") != issuer.url:
                problems.append(f"{url} is metadata of issuer {metadata.get('issuer')!r}")
                continue
            jwks_uri = metadata.get("jwks_uri")
            if isinstance(jwks_uri, str):
                return jwks_uri
            problems.append(f"{url} names no jwks_uri")
        raise EgressRefused("; ".join(dict.fromkeys(problems)))


def metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be: OpenID Connect Discovery first, then RFC 8414."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    origin = f"{parts.scheme}://{parts.netloc}"
    urls = [
        f"{issuer.rstrip('/')}/.well-known/openid-configuration",
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}/.well-known/openid-configuration{path}",
    ]
    return list(dict.fromkeys(urls))


def _public_keys(jwks: dict, url: str) -> list[Key]:
    keys = []
    for data in jwks.get("keys") or []:
        if not isinstance(data, dict) or data.get("kty") not in KEY_TYPES.values() or data.get("use", "sig") != "sig":
            continue
        try:
            keys.append(KeySet.registry_cls.import_key(data))
        except Exception as exc:  # one malformed key must not cost the others
            log.warning("skipping a key of %s: %s", url, exc)
    if not keys:
        raise EgressRefused(f"{url} holds no usable signing key")
    return keys


def _pick(keys: list[Key], kid: str | None, alg: str) -> Key | None:
    key_type = KEY_TYPES.get(alg[:2])
    fitting = [
        k for k in keys
        if k.key_type == key_type and k.get("alg") in (None, alg) and (kid is None or k.kid == kid)
    ]
    # Without a kid only an unambiguous key will do.
    return fitting[0] if len(fitting) == 1 or (kid is not None and fitting) else None
