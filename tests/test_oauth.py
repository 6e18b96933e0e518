"""The gateway as an OAuth resource server, against real issuers on loopback and a real gateway.

Each `Issuer` is an HTTP server in a thread that publishes OpenID metadata
and a JWKS, and mints tokens with joserfc; tests also forge tokens by hand
(`alg: none`, HS256 keyed with the public key) the way an attacker would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey

from gateway.oauth.egress import Egress, EgressRefused, vet_address, vet_url
from gateway.oauth.keys import metadata_urls
from tests.clients import connect, structured, text_of
from tests.conftest import make_fleet

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class Issuer:
    """An authorization server as far as a resource server sees one: metadata, keys, tokens."""

    def __init__(self, path: str = ""):
        self.keys: list[Key] = [RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})]
        self.hits: dict[str, int] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                if self.path == f"{path}/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks", "response_types_supported": ["code"]}
                elif self.path == f"{path}/jwks":
                    body = {"keys": [k.as_dict(private=False) for k in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def jwks_fetches(self) -> int:
        return sum(n for p, n in self.hits.items() if p.endswith("/jwks"))

    def mint(self, audience: str, *, key: Key | None = None, header: dict | None = None, **claims: Any) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        body = {"iss": self.url, "sub": "user-1", "aud": audience, "iat": now, "exp": now + 300, "scope": "mcp openid",
                **claims}
        body = {k: v for k, v in body.items() if v is not None}
        head = {"alg": key.get("alg") or "RS256", "kid": key.kid, "typ": "at+jwt", **(header or {})}
        return jwt.encode(head, body, key, algorithms=[head["alg"]])

    def stop(self) -> None:
        self.server.shutdown()


def forge(header: dict, claims: dict, sign: Any = None) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def issuers():
    made = {name: Issuer("/realms/acme" if name == "acme" else "") for name in ("acme", "beta", "rotating")}
    yield made
    for issuer in made.values():
        issuer.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, issuers):
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_ALLOW_PRIVATE_ISSUERS="1")
    running.env["MCPFLEET_PUBLIC_URL"] = running.mcp_url
    for tenant, issuer in issuers.items():
        running.cli("tenants", "add", tenant)
        running.cli("issuers", "add", "--tenant", tenant, "--issuer", issuer.url)
    running.start()
    yield running
    running.stop()


def post(fleet, token: str | None, body: dict = INIT) -> httpx.Response:
    headers = {**JSON_HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.post(fleet.mcp_url, json=body, headers=headers, timeout=30)


def users(fleet) -> dict[str, dict]:
    listed = json.loads(fleet.cli("users", "list", "--json").stdout)
    return {f"{u['tenant']}/{u['user']}": u for u in listed}


# -- a valid token ------------------------------------------------------------------------------


async def test_valid_token_lists_tools_and_provisions_a_member(fleet, issuers):
    token = issuers["acme"].mint(fleet.mcp_url, sub="sub-dana", preferred_username="dana")
    async with connect(fleet.mcp_url, token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert "exec__run" in names
    assert users(fleet)["acme/dana"]["role"] == "member"

    # The same subject is the same user, whatever name the token gives now.
    renamed = issuers["acme"].mint(fleet.mcp_url, sub="sub-dana", preferred_username="someone-else")
    assert post(fleet, renamed).status_code == 200
    assert "acme/someone-else" not in users(fleet)


async def test_the_token_never_reaches_the_sandbox(fleet, issuers):
    token = issuers["acme"].mint(fleet.mcp_url, sub="sub-dana", preferred_username="dana")
    async with connect(fleet.mcp_url, token, "2026-07-28") as client:
        result = await client.call_tool("exec__run", {"command": "env; cat /proc/self/environ; ls -a /workspace",
                                                      "timeout_s": 30})
    assert not result.is_error, text_of(result)
    seen = json.dumps(structured(result))
    signature = token.rsplit(".", 1)[1]
    for secret in (token, signature, token.split(".")[1], "Bearer", "eyJ"):
        assert secret not in seen


def test_api_keys_still_work(fleet):
    key = fleet.add_user("erin", tenant="acme")
    assert post(fleet, key).status_code == 200


# -- refused tokens -----------------------------------------------------------------------------


def refused_tokens(fleet, issuers) -> dict[str, str]:
    acme = issuers["acme"]
    good_key = acme.keys[0]
    now = int(time.time())
    claims = {"iss": acme.url, "sub": "mallory", "aud": fleet.mcp_url, "exp": now + 300, "scope": "mcp"}
    public_pem = good_key.as_pem(private=False)
    public_jwk = json.dumps(good_key.as_dict(private=False)).encode()
    impostor = RSAKey.generate_key(2048, parameters={"kid": good_key.kid, "alg": "RS256"})
    return {
        "wrong audience": acme.mint("https://elsewhere.example/mcp"),
        "audience of another resource on this host": acme.mint(fleet.base_url + "/other"),
        "no audience": acme.mint(fleet.mcp_url, aud=None),
        "expired": acme.mint(fleet.mcp_url, exp=now - 120, iat=now - 600),
        "not yet valid": acme.mint(fleet.mcp_url, nbf=now + 600),
        "no expiry": acme.mint(fleet.mcp_url, exp=None),
        "no subject": acme.mint(fleet.mcp_url, sub=None),
        "untrusted issuer": acme.mint(fleet.mcp_url, iss="http://127.0.0.1:9/not-trusted"),
        "alg none": forge({"alg": "none", "kid": good_key.kid}, claims),
        "alg none, no signature part": forge({"alg": "none"}, claims).rsplit(".", 1)[0],
        "same kid, other key": acme.mint(fleet.mcp_url, key=impostor),
        "HS256 keyed with the public PEM": forge(
            {"alg": "HS256", "kid": good_key.kid}, claims, lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "HS256 keyed with the public JWK": forge(
            {"alg": "HS256", "kid": good_key.kid}, claims, lambda m: hmac.new(public_jwk, m, hashlib.sha256).digest()),
        "beta's key for acme's issuer": issuers["beta"].mint(fleet.mcp_url, iss=acme.url, header={"kid": good_key.kid}),
        "tampered claims": ".".join([(t := acme.mint(fleet.mcp_url)).split(".")[0],
                                     forge({}, {**claims, "sub": "root"}).split(".")[1], t.split(".")[2]]),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.not-json.AAAA",
    }


def test_invalid_tokens_are_401_invalid_token(fleet, issuers):
    before = set(users(fleet))
    for why, token in refused_tokens(fleet, issuers).items():
        response = post(fleet, token)
        assert response.status_code == 401, why
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, why
    assert set(users(fleet)) == before  # nobody was provisioned by a refused token
    assert issuers["acme"].jwks_fetches <= 1  # refusals did not make the gateway fetch keys again


def test_missing_scope_is_403_insufficient_scope(fleet, issuers):
    for scope in ("openid profile", None):
        response = post(fleet, issuers["acme"].mint(fleet.mcp_url, sub="sub-dana", scope=scope))
        assert response.status_code == 403
        challenge = response.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert 'scope="mcp"' in challenge
        assert f'resource_metadata="{fleet.base_url}/.well-known/oauth-protected-resource/mcp"' in challenge


def test_scope_as_a_list_under_scp(fleet, issuers):
    token = issuers["acme"].mint(fleet.mcp_url, sub="sub-dana", scope=None, scp=["mcp"])
    assert post(fleet, token).status_code == 200


# -- tenants ------------------------------------------------------------------------------------


async def test_an_issuer_reaches_only_its_own_tenant(fleet, issuers):
    alice = fleet.add_user("alice", tenant="acme")
    async with connect(fleet.mcp_url, alice) as client:
        written = await client.call_tool("workspace__write_file", {"path": "secret.txt", "content": "acme-secret-41"})
        assert not written.is_error, text_of(written)

    # beta's issuer vouches for an "alice" and claims acme every way a token can.
    forged = issuers["beta"].mint(fleet.mcp_url, sub="alice", preferred_username="alice", email="alice@acme",
                                  tenant="acme", tid="acme", groups=["acme"])
    async with connect(fleet.mcp_url, forged) as client:
        read = await client.call_tool("workspace__read_file", {"path": "secret.txt"})
        listing = await client.call_tool("workspace__list_dir", {"path": "."})
    assert read.is_error and "acme-secret-41" not in text_of(read)
    assert "secret.txt" not in text_of(listing)
    known = users(fleet)
    assert "beta/alice" in known and known["acme/alice"]["role"] == "member"

    # acme's own issuer naming a subject "alice" gets a new user, not the existing account.
    namesake = issuers["acme"].mint(fleet.mcp_url, sub="another-alice", preferred_username="alice")
    assert post(fleet, namesake).status_code == 200
    assert "acme/alice-2" in users(fleet)

    # One issuer, one tenant.
    refused = fleet.cli("issuers", "add", "--tenant", "beta", "--issuer", issuers["acme"].url, check=False)
    assert refused.returncode != 0 and "already trusted" in refused.stderr


# -- keys ---------------------------------------------------------------------------------------


def test_unknown_kid_fetches_the_keys_once_and_rotation_works(fleet, issuers):
    rotating = issuers["rotating"]
    assert post(fleet, rotating.mint(fleet.mcp_url, sub="r")).status_code == 200
    fetched = rotating.jwks_fetches
    assert fetched == 1

    rotating.keys.insert(0, ECKey.generate_key("P-256", parameters={"kid": "k2", "alg": "ES256"}))
    assert post(fleet, rotating.mint(fleet.mcp_url, sub="r")).status_code == 200
    assert rotating.jwks_fetches == fetched + 1

    # A flood of made-up key ids costs the issuer nothing more.
    for n in range(20):
        bogus = rotating.mint(fleet.mcp_url, sub="r", header={"kid": f"bogus-{n}"})
        assert post(fleet, bogus).status_code == 401
    assert rotating.jwks_fetches == fetched + 1


def test_removing_an_issuer_takes_effect_at_once(fleet, issuers, tmp_path_factory):
    rotating = issuers["rotating"]
    token = rotating.mint(fleet.mcp_url, sub="r")
    assert post(fleet, token).status_code == 200
    fleet.cli("issuers", "remove", rotating.url)
    deadline = time.monotonic() + 5
    while post(fleet, token).status_code != 401:
        assert time.monotonic() < deadline, "a removed issuer's token still works"
        time.sleep(0.1)
    assert rotating.url not in fleet.cli("issuers", "list").stdout


# -- what clients discover ----------------------------------------------------------------------


def test_protected_resource_metadata_and_the_401_challenge(fleet, issuers):
    expected = f"{fleet.base_url}/.well-known/oauth-protected-resource/mcp"
    response = post(fleet, None)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and f'resource_metadata="{expected}"' in challenge
    assert "error=" not in challenge  # RFC 6750 §3.1: no error code when no token was sent

    for url in (expected, f"{fleet.base_url}/.well-known/oauth-protected-resource"):
        document = httpx.get(url).json()
        assert document["resource"] == fleet.mcp_url
        assert {issuers["acme"].url, issuers["beta"].url} <= set(document["authorization_servers"])
        assert document["scopes_supported"] == ["mcp"]
        assert document["bearer_methods_supported"] == ["header"]


# -- fetching from issuers: no way into the gateway's network ---------------------------------


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "fe80::1", "::ffff:169.254.169.254",
                                     "169.254.10.1", "0.0.0.0", "224.0.0.1"])
def test_metadata_and_link_local_addresses_are_always_refused(address):
    for allow_private in (False, True):
        with pytest.raises(EgressRefused):
            vet_address(address, allow_private=allow_private)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "100.64.0.1"])
def test_private_addresses_need_the_setting(address):
    with pytest.raises(EgressRefused):
        vet_address(address, allow_private=False)
    vet_address(address, allow_private=True)


def test_public_https_passes_and_plain_http_needs_the_setting():
    vet_address("93.184.215.14", allow_private=False)
    vet_url("https://idp.example.com/realms/a", allow_private=False)
    with pytest.raises(EgressRefused):
        vet_url("http://idp.example.com", allow_private=False)


async def test_a_name_resolving_to_loopback_is_refused_at_connect_time(issuers):
    acme = issuers["acme"]
    before = sum(acme.hits.values())
    egress = Egress(allow_private=False)
    try:
        # https passes the URL check; the name is refused once resolved, before any connection.
        with pytest.raises(EgressRefused, match="private or loopback"):
            await egress.get_json(acme.url.replace("http://127.0.0.1", "https://localhost") + "/jwks")
    finally:
        await egress.aclose()
    assert sum(acme.hits.values()) == before


def test_metadata_locations_for_an_issuer_with_a_path():
    assert metadata_urls("https://idp.example/realms/a") == [
        "https://idp.example/realms/a/.well-known/openid-configuration",
        "https://idp.example/.well-known/oauth-authorization-server/realms/a",
        "https://idp.example/.well-known/openid-configuration/realms/a",
    ]


def test_a_gateway_without_the_setting_fetches_nothing_private(tmp_path_factory, postgres_url, issuers):
    strict = make_fleet(tmp_path_factory, postgres_url)
    strict.env["MCPFLEET_PUBLIC_URL"] = strict.mcp_url
    strict.cli("tenants", "add", "cloud")
    strict.cli("issuers", "add", "--tenant", "cloud", "--issuer", "https://169.254.169.254")
    strict.cli("issuers", "add", "--tenant", "cloud", "--issuer", "https://[fe80::1]/idp")
    strict.cli("issuers", "add", "--tenant", "cloud", "--issuer", issuers["beta"].url)
    strict.start()
    try:
        beta = issuers["beta"]
        before = sum(beta.hits.values())
        for iss in ("https://169.254.169.254", "https://[fe80::1]/idp", beta.url):
            assert post(strict, beta.mint(strict.mcp_url, iss=iss)).status_code == 401, iss
        assert sum(beta.hits.values()) == before  # the loopback issuer was never contacted
        log = strict.log()
        assert "169.254.169.254 is link-local or a metadata address" in log
        assert "fe80::1 is link-local or a metadata address" in log
        assert "is not https" in log
    finally:
        strict.stop()
