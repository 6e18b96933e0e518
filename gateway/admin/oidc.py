"""Signing in to the admin page with the tenant's identity provider (OpenID Connect).

Authorization code flow with PKCE (S256) against an issuer the fleet already
trusts (`mcpfleet issuers add`). `state`, `nonce` and the PKCE verifier live in
a short-lived signed cookie of the browser that started the flow; the callback
checks `state` against it, redeems the code with the verifier, and accepts the
ID token only when it verifies against the issuer's JWKS and names the issuer,
our client id as audience (and authorized party), an unexpired time, and our
nonce. The user is found by (issuer, `sub`) exactly as for bearer tokens
(gateway/oauth), and gets a session only as an admin or auditor.

Every request to an issuer goes through the gateway's vetted egress (no private
addresses unless allowed, no redirects followed). Client credentials come from
the environment: `MCPFLEET_ADMIN_OIDC_CLIENT_ID` / `MCPFLEET_ADMIN_OIDC_CLIENT_SECRET`
for every issuer, or per issuer in `MCPFLEET_ADMIN_OIDC_CLIENTS`, a JSON object
`{"<issuer URL>": {"client_id": "...", "client_secret": "..."}}`. Without a
secret the client is public (PKCE alone, auth method `none`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import itsdangerous
import psycopg
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, JoseError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from core import audit
from core.accounts import AccountError
from gateway.admin.pages import Pages, render
from gateway.admin.session import ROLES, Sessions
from gateway.oauth import store
from gateway.oauth.egress import EgressRefused, VettedTransport, vet_url
from gateway.oauth.keys import NoKey, metadata_urls
from gateway.oauth.store import Issuer
from gateway.oauth.tokens import ALGORITHMS, LEEWAY_S, OAuthVerifier

log = logging.getLogger(__name__)

CALLBACK_PATH = "/admin/oidc/callback"
# The flow's state travels with the browser. SameSite=Lax, not Strict: the identity provider's
# redirect back to us is a cross-site navigation, on which a Strict cookie would not be sent.
FLOW_COOKIE = "__Host-mcpfleet-oidc"
FLOW_S = 600
SCOPE = "openid profile email"
TOKEN_TIMEOUT_S = 10.0
AUTH_METHODS = ("client_secret_basic", "client_secret_post")


class SignInFailed(Exception):
    """Why a sign-in through the identity provider was refused; shown to the user, also logged."""


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    client_secret: str | None = None


class Clients:
    """Our client registration at each issuer."""

    def __init__(self, default: Client | None, per_issuer: Mapping[str, Client]):
        self.default = default
        self.per_issuer = dict(per_issuer)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Clients:
        env = os.environ if environ is None else environ
        client_id = env.get("MCPFLEET_ADMIN_OIDC_CLIENT_ID")
        default = Client(client_id, env.get("MCPFLEET_ADMIN_OIDC_CLIENT_SECRET") or None) if client_id else None
        per_issuer: dict[str, Client] = {}
        raw = env.get("MCPFLEET_ADMIN_OIDC_CLIENTS")
        if raw:
            try:
                document = json.loads(raw)
                for issuer, entry in document.items():
                    per_issuer[issuer] = Client(str(entry["client_id"]), entry.get("client_secret") or None)
            except (ValueError, AttributeError, KeyError, TypeError):
                raise SystemExit(
                    'MCPFLEET_ADMIN_OIDC_CLIENTS must be a JSON object {"<issuer URL>": {"client_id": ..., "client_secret": ...}}'
                ) from None
        return cls(default, per_issuer)

    def for_issuer(self, url: str) -> Client | None:
        return self.per_issuer.get(url) or self.default


class OidcSignIn:
    def __init__(self, sessions: Sessions, pages: Pages, oauth: OAuthVerifier, clients: Clients, *,
                 secret: bytes, public_url: str, allow_private: bool):
        self.sessions = sessions
        self.pages = pages
        self.oauth = oauth
        self.clients = clients
        self.allow_private = allow_private
        parts = urlsplit(public_url)
        # Derived from the configured public URL, never from the request's Host header.
        self.redirect_uri = f"{parts.scheme}://{parts.netloc}{CALLBACK_PATH}"
        self._flows = itsdangerous.URLSafeTimedSerializer(secret, salt="mcpfleet.admin-oidc-flow")

    async def issuers(self) -> list[str]:
        """Trusted issuers we have a client at: the login page offers these."""
        async with self.sessions.pool.connection() as conn:
            trusted = await store.list_issuers(conn)
        return [i.url for i in trusted if self.clients.for_issuer(i.url) is not None]

    async def start(self, request: Request) -> Response:
        wanted = request.query_params.get("issuer", "")
        try:
            issuer, client = await self._issuer_and_client(wanted)
            metadata = await self._metadata(issuer)
            methods = metadata.get("code_challenge_methods_supported")
            if isinstance(methods, list) and "S256" not in methods:
                raise SignInFailed(f"{issuer.url} does not support PKCE with S256")
            endpoint = _endpoint(metadata, "authorization_endpoint", self.allow_private)
        except SignInFailed as exc:
            return await self._refused(request, str(exc), issuer=wanted)
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        location = prepare_grant_uri(
            endpoint, client.client_id, "code", redirect_uri=self.redirect_uri, scope=SCOPE, state=state, nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
        )
        response = RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})
        flow = self._flows.dumps({"issuer": issuer.url, "state": state, "nonce": nonce, "verifier": verifier})
        response.set_cookie(FLOW_COOKIE, flow, max_age=FLOW_S, path="/", secure=True, httponly=True, samesite="lax")
        return response

    async def callback(self, request: Request) -> Response:
        params = request.query_params
        flow = self._flow(request)
        try:
            if flow is None:
                raise SignInFailed("The sign-in took too long or was started in another browser; please try again.")
            if not secrets.compare_digest(params.get("state", "").encode(), flow["state"].encode()):
                raise SignInFailed("The sign-in answer does not belong to this browser's sign-in (state differs).")
            if params.get("error"):
                raise SignInFailed(f"The identity provider refused: {params['error']} {params.get('error_description', '')}".strip())
            if not params.get("code"):
                raise SignInFailed("The identity provider sent no authorization code.")
            issuer, client = await self._issuer_and_client(flow["issuer"])
            metadata = await self._metadata(issuer)
            id_token = await self._redeem(metadata, client, params["code"], flow["verifier"])
            claims = await self._verify(id_token, issuer, client, flow["nonce"])
            async with self.sessions.pool.connection() as conn:
                identity = await store.user_for_subject(conn, issuer, claims["sub"], claims)
                if identity.role not in ROLES:
                    await audit.append(
                        conn, action="admin.login", outcome="denied", tenant=identity.tenant, actor=identity.principal,
                        detail={"via": issuer.url, "reason": f"role {identity.role}"},
                    )
                    raise SignInFailed("Only admins and auditors may use this page.")
                cookie = await self.sessions.open(conn, identity, issuer=issuer.url)
                await audit.append(
                    conn, action="admin.login", outcome="ok", tenant=identity.tenant, actor=identity.principal,
                    detail={"via": issuer.url},
                )
        except (SignInFailed, AccountError, psycopg.Error) as exc:
            return await self._refused(request, str(exc) if isinstance(exc, SignInFailed) else "The user could not be found.",
                                       issuer=flow["issuer"] if flow else "")
        # A page of ours moves on to /admin: the redirect chain began at the identity provider, and
        # Chromium would not send the new SameSite=Strict cookie on a navigation that is part of it.
        response = render("continue.html")
        self.sessions.set_cookie(response, cookie)
        _forget_flow(response)
        return response

    async def _refused(self, request: Request, message: str, *, issuer: str) -> Response:
        log.info("admin sign-in through %r refused: %s", issuer, message)
        response = await self.pages.login_form(request, error=message, status_code=403)
        _forget_flow(response)
        return response

    def _flow(self, request: Request) -> dict[str, str] | None:
        value = request.cookies.get(FLOW_COOKIE)
        if not value:
            return None
        try:
            flow = self._flows.loads(value, max_age=FLOW_S)
        except itsdangerous.BadSignature:
            return None
        return flow if isinstance(flow, dict) and all(isinstance(flow.get(k), str) for k in ("issuer", "state", "nonce", "verifier")) else None

    async def _issuer_and_client(self, url: str) -> tuple[Issuer, Client]:
        async with self.sessions.pool.connection() as conn:
            issuer = await store.find_issuer(conn, url)
        client = self.clients.for_issuer(url)
        if issuer is None or client is None:
            raise SignInFailed("That identity provider is not set up for signing in here.")
        return issuer, client

    async def _metadata(self, issuer: Issuer) -> dict[str, Any]:
        problems = []
        for url in metadata_urls(issuer.url):
            try:
                metadata = await self.oauth.egress.get_json(url)
            except EgressRefused as exc:
                problems.append(str(exc))
                continue
            # Metadata naming another issuer could point us at anyone's endpoints (RFC 8414 §3.3).
            if metadata.get("issuer") == issuer.url:
                return metadata
            problems.append(f"{url} is metadata of issuer {metadata.get('issuer')!r}")
        log.warning("no usable metadata for issuer %s: %s", issuer.url, "; ".join(problems))
        raise SignInFailed(f"The identity provider {issuer.url} could not be reached.")

    async def _redeem(self, metadata: dict[str, Any], client: Client, code: str, verifier: str) -> str:
        endpoint = _endpoint(metadata, "token_endpoint", self.allow_private)
        supported = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        method = "none" if client.client_secret is None else next((m for m in AUTH_METHODS if m in supported), AUTH_METHODS[0])
        body = prepare_token_request("authorization_code", code=code, redirect_uri=self.redirect_uri, code_verifier=verifier)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        _, headers, body = ClientAuth(client.client_id, client.client_secret, method).prepare("POST", endpoint, headers, body)
        transport = VettedTransport(allow_private=self.allow_private)
        async with httpx.AsyncClient(transport=transport, timeout=TOKEN_TIMEOUT_S, follow_redirects=False) as http:
            try:
                answer = await http.post(endpoint, content=body, headers=headers)
            except (httpx.HTTPError, EgressRefused) as exc:
                log.warning("token request to %s failed: %s", endpoint, exc)
                raise SignInFailed("The identity provider could not be reached to finish the sign-in.") from None
        try:
            document = answer.json()
        except ValueError:
            document = {}
        if answer.status_code != 200 or not isinstance(document, dict):
            error = document.get("error") if isinstance(document, dict) else None
            raise SignInFailed(f"The identity provider did not accept the sign-in ({error or answer.status_code}).")
        id_token = document.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("The identity provider sent no ID token.")
        return id_token

    async def _verify(self, id_token: str, issuer: Issuer, client: Client, nonce: str) -> dict[str, Any]:
        try:
            header = jws.extract_compact(id_token.encode()).protected
            alg = header.get("alg")
            if alg not in ALGORITHMS:
                raise SignInFailed(f"The ID token's algorithm {alg!r} is not accepted.")
            kid = header.get("kid")
            key = await self.oauth.keys.key_for(issuer, kid if isinstance(kid, str) else None, alg)
            token = jwt.decode(id_token, key, algorithms=[alg])
            CodeIDToken(
                token.claims,
                token.header,
                options={"iss": {"essential": True, "value": issuer.url}, "aud": {"essential": True, "value": client.client_id}},
                params={"nonce": nonce, "client_id": client.client_id},
            ).validate(leeway=LEEWAY_S)
        except (NoKey, BadSignatureError) as exc:
            log.info("ID token of %s: %s", issuer.url, exc)
            raise SignInFailed("The ID token is not signed by the identity provider's keys.") from None
        except JoseError as exc:
            log.info("ID token of %s refused: %s", issuer.url, exc)
            raise SignInFailed(f"The ID token was refused ({exc.description or exc.error}).") from None
        except ValueError as exc:
            raise SignInFailed(f"The ID token is malformed ({exc}).") from None
        if not isinstance(token.claims.get("sub"), str) or not token.claims["sub"]:
            raise SignInFailed("The ID token names no subject.")
        return dict(token.claims)


def _endpoint(metadata: dict[str, Any], name: str, allow_private: bool) -> str:
    url = metadata.get(name)
    if not isinstance(url, str):
        raise SignInFailed(f"The identity provider's metadata has no {name}.")
    try:
        vet_url(url, allow_private=allow_private)
    except EgressRefused as exc:
        raise SignInFailed(f"The identity provider's {name} is not usable: {exc}") from None
    return url


def _forget_flow(response: Response) -> None:
    response.delete_cookie(FLOW_COOKIE, path="/", secure=True, httponly=True, samesite="lax")
