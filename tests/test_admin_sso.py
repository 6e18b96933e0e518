"""Signing in to the admin page through a tenant's identity provider, in a real browser.

`Provider` is an OpenID provider on loopback, speaking the protocol a real one
does (discovery, JWKS, an authorize endpoint, a token endpoint that checks the
client, the redirect URI, the code and its PKCE verifier), minting ID tokens
with joserfc. It consents at once, as the user it is told to be, and can be
told to misbehave the way a forged or replayed answer would.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import psycopg
import pytest
from authlib.oauth2.rfc7636.challenge import compare_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import RSAKey
from playwright.async_api import expect

from gateway.admin.oidc import FLOW_COOKIE
from gateway.admin.session import COOKIE
from tests.browser import browser, context  # noqa: F401  (fixtures)
from tests.conftest import make_fleet

CLIENT_ID = "mcpfleet-admin"
CLIENT_SECRET = "s3cret-" + "x" * 24


class Provider:
    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "p1", "alg": "RS256", "use": "sig"})
        self.signing_key = self.key  # a test may sign with a key the JWKS does not hold
        self.subject = "sub-1"
        self.claims: dict[str, Any] = {"preferred_username": "erin"}
        self.overrides: dict[str, Any] = {}  # claims to change in the next ID tokens
        self.redirect_uris: set[str] = set()
        self.codes: dict[str, dict[str, Any]] = {}
        self.authorize_requests: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path == "/.well-known/openid-configuration":
                    self.answer(200, provider.metadata())
                elif path == "/jwks":
                    self.answer(200, {"keys": [provider.key.as_dict(private=False)]})
                elif path == "/authorize":
                    self.redirect(provider.authorize({k: v[0] for k, v in parse_qs(query).items()}))
                else:
                    self.answer(404, {"error": "not_found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if self.path != "/token":
                    self.answer(404, {"error": "not_found"})
                    return
                status, document = provider.token({k: v[0] for k, v in parse_qs(body).items()}, self.headers.get("Authorization"))
                self.answer(status, document)

            def answer(self, status: int, document: dict) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }

    def authorize(self, params: dict[str, str]) -> str:
        """Consents at once: the redirect back to the client, with a code or an error."""
        self.authorize_requests.append(params)
        redirect_uri = params.get("redirect_uri", "")
        if params.get("client_id") != CLIENT_ID or redirect_uri not in self.redirect_uris:
            return f"{self.url}/unknown-client"  # never redirect to an unregistered URI
        if params.get("response_type") != "code" or params.get("code_challenge_method") != "S256" \
                or "openid" not in params.get("scope", "").split() or not params.get("code_challenge"):
            return f"{redirect_uri}?{urlencode({'error': 'invalid_request', 'state': params.get('state', '')})}"
        code = secrets.token_urlsafe(24)
        self.codes[code] = {**params, "sub": self.subject, "issued": time.time()}
        return f"{redirect_uri}?{urlencode({'code': code, 'state': params.get('state', '')})}"

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(form)
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if authorization != expected:
            return 401, {"error": "invalid_client"}
        grant = self.codes.pop(form.get("code", ""), None)  # a code works once
        if form.get("grant_type") != "authorization_code" or grant is None or time.time() - grant["issued"] > 60:
            return 400, {"error": "invalid_grant"}
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri differs"}
        if not compare_s256_code_challenge(form.get("code_verifier", ""), grant["code_challenge"]):
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        claims = {"iss": self.url, "sub": grant["sub"], "aud": CLIENT_ID, "iat": now, "exp": now + 300,
                  "nonce": grant.get("nonce"), **self.claims, **self.overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": "RS256", "kid": self.signing_key.kid, "typ": "JWT"}
        id_token = jwt.encode(header, claims, self.signing_key, algorithms=["RS256"])
        return 200, {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer", "expires_in": 300, "id_token": id_token}

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def provider():
    running = Provider()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, provider):
    running = make_fleet(
        tmp_path_factory, postgres_url, MCPFLEET_ALLOW_PRIVATE_ISSUERS="1",
        MCPFLEET_ADMIN_OIDC_CLIENT_ID=CLIENT_ID, MCPFLEET_ADMIN_OIDC_CLIENT_SECRET=CLIENT_SECRET,
    )
    provider.redirect_uris.add(f"{running.base_url}/admin/oidc/callback")
    running.cli("tenants", "add", "acme")
    running.cli("issuers", "add", "--tenant", "acme", "--issuer", provider.url)
    running.start()
    yield running
    running.stop()


@pytest.fixture
def reset(provider):
    yield
    provider.signing_key = provider.key
    provider.overrides = {}
    provider.subject = "sub-1"
    provider.claims = {"preferred_username": "erin"}


def add_subject(fleet, provider, subject: str, name: str, role: str) -> None:
    """A user of the provider's tenant known by (issuer, sub), as a first sign-in would have left them."""
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO users (tenant_id, name, role, subject_issuer, subject)
               SELECT id, %s, %s, %s, %s FROM tenants WHERE name = 'acme' ON CONFLICT DO NOTHING""",
            (name, role, provider.url, subject),
        )


def flip_last(text: str) -> str:
    """Changes a character near the end that carries whole bits: the very last one of a base64
    signature may hold only padding bits, and changing those changes nothing."""
    return text[:-5] + ("x" if text[-5] != "x" else "y") + text[-4:]


def set_role(fleet, subject: str, role: str) -> None:
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute("UPDATE users SET role = %s WHERE subject = %s", (role, subject))


async def sign_in_with_provider(context, fleet, provider):
    page = await context.new_page()
    await page.goto(f"{fleet.base_url}/admin/login")
    await page.click(f"a.provider:has-text('{provider.url}')")
    await page.wait_for_load_state()
    return page


async def session_cookie(context) -> dict | None:
    return next((c for c in await context.cookies() if c["name"] == COOKIE), None)


def signed_in(fleet, value: str) -> bool:
    answer = httpx.get(f"{fleet.base_url}/admin", headers={"Cookie": f"{COOKIE}={value}"}, timeout=30)
    return answer.status_code == 200 and 'name="csrf-token"' in answer.text


async def test_an_admin_signs_in_through_the_identity_provider(fleet, provider, context, reset):
    provider.subject, provider.claims = "sub-admin", {"preferred_username": "olga"}
    # First sight provisions a member, as a bearer token would: no session for a member.
    page = await sign_in_with_provider(context, fleet, provider)
    await expect(page.locator("#error")).to_have_text("Only admins and auditors may use this page.")
    assert await session_cookie(context) is None

    set_role(fleet, "sub-admin", "admin")
    page = await sign_in_with_provider(context, fleet, provider)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    await expect(page.locator("#who")).to_have_text("acme/olga")
    cookie = await session_cookie(context)
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    # The flow's cookie is gone once it served.
    assert all(c["name"] != FLOW_COOKIE for c in await context.cookies())

    # What the provider saw: code flow, PKCE S256, a state and a nonce, our client and callback.
    asked = provider.authorize_requests[-1]
    assert asked["response_type"] == "code" and asked["code_challenge_method"] == "S256"
    assert asked["client_id"] == CLIENT_ID and asked["redirect_uri"] == f"{fleet.base_url}/admin/oidc/callback"
    assert len(asked["state"]) >= 32 and len(asked["nonce"]) >= 32 and asked["state"] != asked["nonce"]
    assert "openid" in asked["scope"].split()
    assert provider.token_requests[-1]["code_verifier"]

    # The role is read again on every request: demoted, the session ends at once.
    assert signed_in(fleet, cookie["value"])
    set_role(fleet, "sub-admin", "member")
    assert not signed_in(fleet, cookie["value"])
    set_role(fleet, "sub-admin", "admin")
    assert signed_in(fleet, cookie["value"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"overrides": {"nonce": "another-nonce"}}, "nonce"),
        ({"overrides": {"aud": "some-other-client"}}, "aud"),
        ({"overrides": {"aud": [CLIENT_ID, "some-other-client"], "azp": "some-other-client"}}, "azp"),
        ({"overrides": {"iss": "http://127.0.0.1:1/elsewhere"}}, "iss"),
        ({"overrides": {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}}, "exp"),
        ({"overrides": {"nonce": None}}, "nonce"),
        ({"signing_key": "foreign"}, "not signed by the identity provider's keys"),
    ],
    ids=["wrong-nonce", "wrong-audience", "foreign-authorized-party", "wrong-issuer", "expired", "no-nonce", "foreign-key"],
)
async def test_a_bad_id_token_gets_no_session(fleet, provider, context, reset, change, message):
    provider.subject = "sub-admin-2"
    add_subject(fleet, provider, "sub-admin-2", "admin-two", "admin")
    provider.overrides = change.get("overrides", {})
    if change.get("signing_key") == "foreign":
        provider.signing_key = RSAKey.generate_key(2048, parameters={"kid": "p1", "alg": "RS256", "use": "sig"})
    page = await sign_in_with_provider(context, fleet, provider)
    await expect(page).to_have_url(re.compile(r"/admin/oidc/callback\?"))
    await expect(page.locator("#error")).to_contain_text(message)
    assert await session_cookie(context) is None


def test_the_answer_must_belong_to_the_browser_that_asked(fleet, provider, reset):
    """state ties the callback to the flow cookie; a code works once and only with its verifier."""
    provider.subject = "sub-3"
    add_subject(fleet, provider, "sub-3", "admin-three", "admin")
    start = httpx.get(f"{fleet.base_url}/admin/oidc/start", params={"issuer": provider.url}, timeout=30)
    assert start.status_code == 303
    flow = re.search(rf"{FLOW_COOKIE}=([^;]+)", start.headers["set-cookie"]).group(1)
    at_provider = httpx.get(start.headers["location"], timeout=30)
    back = urlsplit(at_provider.headers["location"])
    params = {k: v[0] for k, v in parse_qs(back.query).items()}
    callback = f"{fleet.base_url}/admin/oidc/callback"

    def call(query: dict, cookie: str | None) -> httpx.Response:
        headers = {"Cookie": f"{FLOW_COOKIE}={cookie}"} if cookie else {}
        return httpx.get(callback, params=query, headers=headers, timeout=30)

    # Another browser (no flow cookie), or a forged state: refused before the code is redeemed.
    redeemed = len(provider.token_requests)
    refused = call(params, None)
    assert refused.status_code == 403 and COOKIE not in refused.headers.get("set-cookie", "")
    refused = call({**params, "state": flip_last(params["state"])}, flow)
    assert refused.status_code == 403 and "state differs" in refused.text
    # A flow cookie that was not ours: refused.
    assert call(params, flip_last(flow)).status_code == 403
    assert len(provider.token_requests) == redeemed

    # The right browser, once.
    accepted = call(params, flow)
    assert accepted.status_code == 200, accepted.text
    assert f"{COOKIE}=" in accepted.headers["set-cookie"]
    replay = call(params, flow)
    assert replay.status_code == 403 and COOKIE not in replay.headers.get("set-cookie", "")


def test_only_trusted_issuers_can_be_started(fleet, provider):
    for issuer in ("https://evil.example", "", provider.url + "/"):
        answer = httpx.get(f"{fleet.base_url}/admin/oidc/start", params={"issuer": issuer}, timeout=30)
        assert answer.status_code == 403
        assert "not set up for signing in here" in answer.text
    page = httpx.get(f"{fleet.base_url}/admin/login", timeout=30).text
    assert f"Sign in with {provider.url}" in page


async def test_removing_the_issuer_ends_its_sessions(fleet, provider, context, reset):
    provider.subject, provider.claims = "sub-temp", {"preferred_username": "tomas"}
    await sign_in_with_provider(context, fleet, provider)  # provisions the member
    set_role(fleet, "sub-temp", "auditor")
    page = await sign_in_with_provider(context, fleet, provider)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    value = (await session_cookie(context))["value"]
    assert signed_in(fleet, value)
    fleet.cli("issuers", "remove", provider.url)
    try:
        assert not signed_in(fleet, value)
    finally:
        fleet.cli("issuers", "add", "--tenant", "acme", "--issuer", provider.url)
