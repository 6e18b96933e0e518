"""The user's own page (/me) in a real browser (Debian's chromium via Playwright) against a real
gateway with its embedded OpenBao: any user signs in with their own key and sets, sees the state
of, and deletes the secrets the servers approved for them declare; values are write-only.

Attacks: bob neither sees nor changes alice's secrets (a forged form naming alice, her server and
her secret changes only bob's own, or nothing); a set without the session's CSRF token is refused;
no session is sent to sign-in; a revoked or expired key cannot sign in; a session of this page
does not open the admin console.

The server version that declares the secret is written to the registry's tables directly, as a
stand-in for publishing it (publishing runs a sandboxed validation of minutes, covered by
tests/test_admin_page.py and tests/test_weather_live.py); it is approved through the gateway's
registry API, and everything this page does goes through the gateway.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from playwright.async_api import BrowserContext, Page, expect

from gateway.admin.mine import COOKIE
from tests.browser import browser, context  # noqa: F401  (fixtures)
from tests.conftest import MCPFLEET, make_fleet
from tests.test_admin_page import cookie_value

SERVER = "io.example/mine-weather"
DECLARED = "WEATHER_API_KEY"
OTHER = "OTHER_TOKEN"
MANIFEST = {
    "$schema": "https://static.modelcontextprotocol.io/schemas/2025-10-17/server.schema.json",
    "name": SERVER, "description": "Current weather, with the user's own API key", "version": "1.0.0",
    "packages": [{"registryType": "pypi", "identifier": "mine-weather", "version": "1.0.0", "transport": {"type": "stdio"}}],
    "_meta": {"io.mcpfleet": {"egress": [], "secrets": [DECLARED, OTHER]}},
}
TOOLS = [{"name": "now", "description": "Current weather.", "inputSchema": {"type": "object", "properties": {}}}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(fleet) -> dict[str, str]:
    found = {name: fleet.add_user(name, role=role) for name, role in
             (("me-admin", "admin"), ("alice", "member"), ("bob", "member"), ("pub", "publisher"))}
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE name = 'default'").fetchone()[0]
        server = conn.execute("INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, %s, 'mineweather') RETURNING id",
                              (tenant, SERVER)).fetchone()[0]
        conn.execute("INSERT INTO registry_versions (server_id, version, manifest, status, validation, tools, validated_at)"
                     " VALUES (%s, '1.0.0', %s, 'passed', %s, %s, now())",
                     (server, json.dumps(MANIFEST), json.dumps([{"check": "trial run", "ok": True, "detail": ""}]),
                      json.dumps(TOOLS)))
    answer = httpx.post(f"{fleet.base_url}/registry/v1/servers/{SERVER}/versions/1.0.0/approve", json={"group": None},
                        headers={"Authorization": f"Bearer {found['me-admin']}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return found


def api_secrets(fleet, key: str) -> dict:
    answer = httpx.get(f"{fleet.base_url}/api/secrets", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def own(fleet, key: str) -> list[tuple[str, str, str]]:
    return [(s["server"], s["name"], s["user"]) for s in api_secrets(fleet, key)["secrets"]]


async def sign_in(context: BrowserContext, fleet, key: str) -> Page:
    page = await context.new_page()
    await page.goto(f"{fleet.base_url}/me")
    await expect(page).to_have_url(re.compile(r"/me/login$"))
    await page.fill("#api_key", key)
    await page.click("#sign-in")
    return page


def row(page: Page, name: str):
    return page.locator(f'#declared tr[data-server="{SERVER}"][data-name="{name}"]')


def login_by_hand(fleet, key: str) -> httpx.Response:
    form = httpx.get(f"{fleet.base_url}/me/login", timeout=30)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    login_cookie = "__Host-mcpfleet-me-login"
    return httpx.post(f"{fleet.base_url}/me/login", data={"csrf_token": token, "api_key": key}, timeout=30,
                      headers={"Cookie": f"{login_cookie}={cookie_value(form, login_cookie)}"}, follow_redirects=False)


def session_of(fleet, key: str) -> tuple[str, str]:
    """(cookie, CSRF token) of a session opened by hand (httpx keeps Secure cookies off plain http)."""
    answer = login_by_hand(fleet, key)
    assert answer.status_code == 303 and answer.headers["location"] == "/me", answer.text
    cookie = cookie_value(answer, COOKIE)
    page = httpx.get(f"{fleet.base_url}/me", headers={"Cookie": f"{COOKIE}={cookie}"}, timeout=30)
    return cookie, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def post(fleet, path: str, cookie: str, data: dict) -> httpx.Response:
    return httpx.post(f"{fleet.base_url}{path}", data=data, headers={"Cookie": f"{COOKIE}={cookie}"}, timeout=60,
                      follow_redirects=False)


async def test_a_member_sets_sees_and_deletes_a_declared_secret_never_shown(fleet, keys, context):  # noqa: F811
    value = f"value-{secrets.token_hex(16)}"
    page = await sign_in(context, fleet, keys["alice"])
    await expect(page).to_have_url(f"{fleet.base_url}/me")
    await expect(page.locator("#who")).to_have_text("default/alice")
    await expect(row(page, DECLARED).locator(".state")).to_have_text("missing")
    await expect(row(page, OTHER).locator(".state")).to_have_text("missing")

    await row(page, DECLARED).locator('input[name="value"]').fill(value)
    await row(page, DECLARED).locator("form.secret-set button").click()
    await expect(page).to_have_url(f"{fleet.base_url}/me?notice=set")
    await expect(row(page, DECLARED).locator(".state")).to_have_text("set by you")
    assert value not in await page.content()
    assert await row(page, DECLARED).locator('input[name="value"]').input_value() == ""
    assert own(fleet, keys["alice"]) == [(SERVER, DECLARED, "alice")]
    assert value not in json.dumps(api_secrets(fleet, keys["alice"]))

    # A tenant-wide value shows as such to whoever has none of their own.
    answer = httpx.put(f"{fleet.base_url}/api/tenant-secrets/{SERVER}/{OTHER}", json={"value": "tenant-wide-value"},
                       headers={"Authorization": f"Bearer {keys['me-admin']}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    await page.reload()
    await expect(row(page, OTHER).locator(".state")).to_have_text("set tenant-wide")
    assert "tenant-wide-value" not in await page.content()

    await row(page, DECLARED).locator("form.secret-delete button").click()
    await expect(page).to_have_url(f"{fleet.base_url}/me?notice=removed")
    await expect(row(page, DECLARED).locator(".state")).to_have_text("missing")
    assert own(fleet, keys["alice"]) == []


async def test_every_role_signs_in_and_a_session_here_does_not_open_the_console(fleet, keys, context):  # noqa: F811
    for name in ("pub", "me-admin"):
        cookie, _ = session_of(fleet, keys[name])
        page = httpx.get(f"{fleet.base_url}/me", headers={"Cookie": f"{COOKIE}={cookie}"}, timeout=30)
        assert page.status_code == 200 and f"default/{name}" in page.text
        # The same cookie value under the console's cookie name: signed under another salt, refused.
        console = httpx.get(f"{fleet.base_url}/admin/console/users",
                            headers={"Cookie": f"__Host-mcpfleet-admin={cookie}"}, timeout=30)
        assert console.status_code == 403


def test_bob_cannot_see_or_touch_alices_secret(fleet, keys):
    value = f"alice-{secrets.token_hex(16)}"
    alice, alice_csrf = session_of(fleet, keys["alice"])
    assert post(fleet, "/me/secrets/set", alice, {"csrf_token": alice_csrf, "server": SERVER, "name": DECLARED,
                                                  "value": value}).status_code == 303
    alice_id = db_one(fleet, "SELECT id FROM users WHERE name = 'alice'")
    bob, bob_csrf = session_of(fleet, keys["bob"])

    page = httpx.get(f"{fleet.base_url}/me", headers={"Cookie": f"{COOKIE}={bob}"}, timeout=30).text
    assert "set by you" not in page and value not in page and "alice" not in page

    # A forged form naming alice (by name and id) changes bob's own secret, never hers.
    forged = {"csrf_token": bob_csrf, "server": SERVER, "name": DECLARED, "value": "bob-value", "user": "alice",
              "user_id": str(alice_id), "tenant": "default"}
    assert post(fleet, "/me/secrets/set", bob, forged).status_code == 303
    assert own(fleet, keys["bob"]) == [(SERVER, DECLARED, "bob")]
    assert own(fleet, keys["alice"]) == [(SERVER, DECLARED, "alice")]
    versions = {s["user"]: s["version"] for s in api_secrets(fleet, keys["alice"])["secrets"]}
    assert versions == {"alice": 1}
    # Bob deletes his own; deleting "alice's" again finds nothing of his and leaves hers alone.
    assert post(fleet, "/me/secrets/delete", bob, {**forged, "value": ""}).status_code == 303
    assert post(fleet, "/me/secrets/delete", bob, {**forged, "value": ""}).status_code == 404
    assert own(fleet, keys["alice"]) == [(SERVER, DECLARED, "alice")]
    # Alice's session token in bob's session is not bob's token.
    assert post(fleet, "/me/secrets/set", bob, {**forged, "csrf_token": alice_csrf}).status_code == 403
    assert own(fleet, keys["bob"]) == []

    # A name no approved server declares, or a server not approved for him, is refused.
    for server, name in ((SERVER, "UNDECLARED"), ("io.example/other", DECLARED)):
        refused = post(fleet, "/me/secrets/set", bob, {"csrf_token": bob_csrf, "server": server, "name": name, "value": "x"})
        assert refused.status_code == 400, refused.text
    assert own(fleet, keys["bob"]) == []
    assert post(fleet, "/me/secrets/delete", alice, {"csrf_token": alice_csrf, "server": SERVER,
                                                     "name": DECLARED}).status_code == 303


def test_without_the_csrf_token_or_a_session_nothing_is_set(fleet, keys):
    cookie, _ = session_of(fleet, keys["bob"])
    refused = post(fleet, "/me/secrets/set", cookie, {"server": SERVER, "name": DECLARED, "value": "no-token"})
    assert refused.status_code == 403
    refused = post(fleet, "/me/secrets/set", cookie, {"csrf_token": "wrong", "server": SERVER, "name": DECLARED, "value": "x"})
    assert refused.status_code == 403
    for path in ("/me/secrets/set", "/me/secrets/delete"):
        answer = httpx.post(f"{fleet.base_url}{path}", data={"server": SERVER, "name": DECLARED, "value": "x"}, timeout=30,
                            follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/me/login"
    answer = httpx.get(f"{fleet.base_url}/me", timeout=30, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/me/login"
    assert own(fleet, keys["bob"]) == []


async def test_a_revoked_or_expired_key_cannot_sign_in_and_revoking_ends_the_session(fleet, context):  # noqa: F811
    revoked = fleet.add_user("me-revoked")
    cookie, _ = session_of(fleet, revoked)
    fleet.cli("keys", "revoke", revoked)
    answer = httpx.get(f"{fleet.base_url}/me", headers={"Cookie": f"{COOKIE}={cookie}"}, timeout=30, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/me/login"
    assert login_by_hand(fleet, revoked).status_code == 401

    fleet.add_user("me-expired")
    done = fleet.cli("keys", "create", "me-expired", "--expires", "1h")
    expired = re.search(r"mcpf_\S+", done.stdout).group(0)
    # A stand-in for an hour passing: the key's expiry moved into the past.
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE expires_at IS NOT NULL"
                     " AND user_id = (SELECT id FROM users WHERE name = 'me-expired')")
    page = await sign_in(context, fleet, expired)
    await expect(page).to_have_url(re.compile(r"/me/login$"))
    await expect(page.locator("#error")).to_have_text("That key is not valid.")


def db_one(fleet, sql: str):
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        return conn.execute(sql).fetchone()[0]


async def test_times_are_utc_time_elements_shown_in_the_browsers_zone(fleet, keys, browser):  # noqa: F811
    """As on the console: the page sends <time datetime="...Z"> with UTC text (the secret's update
    time, the session's end), and a browser in Tokyo shows Tokyo's time for the same instant."""
    assert api_put(fleet, keys["bob"], f"/api/secrets/{SERVER}/{DECLARED}").status_code == 200
    cookie, _ = session_of(fleet, keys["bob"])
    html = httpx.get(f"{fleet.base_url}/me", headers={"Cookie": f"{COOKIE}={cookie}"}, timeout=30).text
    found = re.findall(r'<time datetime="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)" title="([^"]+)">([^<]+)</time>', html)
    assert len(found) == 2, found  # "until ..." and the secret's "updated"
    assert all(title == text and text.endswith(" UTC") for _, title, text in found)
    assert not re.search(r"\d\d:\d\d:\d\d", re.sub(r"<time [^>]*>[^<]*</time>", "", html))  # no raw ISO text left
    tokyo = await browser.new_context(timezone_id="Asia/Tokyo")
    try:
        page = await sign_in(tokyo, fleet, keys["bob"])
        updated = row(page, DECLARED).locator("time")
        await expect(updated).to_have_class(re.compile(r"\blocal\b"))
        instant = datetime.fromisoformat(await updated.get_attribute("datetime"))
        await expect(updated).to_have_text(instant.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S Asia/Tokyo"))
        assert (await updated.get_attribute("title")).endswith(" UTC")
        await expect(page.locator("header time")).to_contain_text("Asia/Tokyo")
    finally:
        await tokyo.close()
        assert api_delete(fleet, keys["bob"], f"/api/secrets/{SERVER}/{DECLARED}").status_code == 204


def api_put(fleet, key: str, path: str) -> httpx.Response:
    return httpx.put(f"{fleet.base_url}{path}", json={"value": f"v-{secrets.token_hex(8)}"},
                     headers={"Authorization": f"Bearer {key}"}, timeout=60)


def api_delete(fleet, key: str, path: str) -> httpx.Response:
    return httpx.delete(f"{fleet.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_name_no_approved_server_declares_is_refused_unless_forced(fleet, keys):
    """The secrets API and `mcpfleet secrets set` refuse a name no approved server of the tenant
    declares for that server, naming what is declared; ?force=1 / --force set it ahead of approval."""
    typo = api_put(fleet, keys["alice"], f"/api/secrets/{SERVER}/WEATHER_APIKEY")
    assert typo.status_code == 409, typo.text
    assert f"{SERVER} declares {OTHER}, {DECLARED}" in typo.json()["error"] and "?force=1" in typo.json()["error"]
    # The right name on a server that is not approved (or not there): which server declares it is named.
    elsewhere = api_put(fleet, keys["me-admin"], f"/api/tenant-secrets/io.example/not-approved/{DECLARED}")
    assert elsewhere.status_code == 409
    assert "no approved server of tenant default is called io.example/not-approved" in elsewhere.json()["error"]
    assert f"{DECLARED} is declared by {SERVER}" in elsewhere.json()["error"]
    tenant_wide = lambda: sorted(s["name"] for s in api_secrets(fleet, keys["me-admin"])["tenant"])  # noqa: E731
    before = tenant_wide()  # the earlier test's OTHER_TOKEN
    assert own(fleet, keys["alice"]) == [] and DECLARED not in before
    # Declared: no flag needed. Forced: set ahead of an approval.
    assert api_put(fleet, keys["alice"], f"/api/secrets/{SERVER}/{DECLARED}").status_code == 200
    assert api_put(fleet, keys["alice"], "/api/secrets/io.example/later/LATER_TOKEN?force=1").status_code == 200
    assert sorted(own(fleet, keys["alice"])) == [("io.example/later", "LATER_TOKEN", "alice"), (SERVER, DECLARED, "alice")]

    def cli_set(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MCPFLEET, "secrets", "set", *args], env=fleet.env, input="cli-value\n",
                              capture_output=True, text=True, timeout=120)

    refused = cli_set("--tenant", "default", SERVER, "NOT_DECLARED")
    assert refused.returncode != 0
    assert f"declares a secret NOT_DECLARED for {SERVER} ({SERVER} declares {OTHER}, {DECLARED})" in refused.stderr, refused.stderr
    assert "--force" in refused.stderr
    assert cli_set("--tenant", "default", SERVER, DECLARED).returncode == 0
    assert cli_set("--force", "--tenant", "default", SERVER, "NOT_DECLARED").returncode == 0
    assert tenant_wide() == sorted([*before, DECLARED, "NOT_DECLARED"])
    for path in (f"/api/secrets/{SERVER}/{DECLARED}", "/api/secrets/io.example/later/LATER_TOKEN"):
        assert api_delete(fleet, keys["alice"], path).status_code == 204
    for name in (DECLARED, "NOT_DECLARED"):
        assert api_delete(fleet, keys["me-admin"], f"/api/tenant-secrets/{SERVER}/{name}").status_code == 204
