"""The admin page in a real browser (Debian's chromium via Playwright) against a real gateway.

Sessions: only admins and auditors sign in; the cookie is HttpOnly, Secure,
SameSite=Strict and signed; every unsafe request needs the session's CSRF
token; logout, a revoked key and a demoted user end the session at once.
"""

from __future__ import annotations

import re
import stat
import time

import httpx
import psycopg
import pytest
from playwright.async_api import BrowserContext, Page, expect

from gateway.admin.session import COOKIE, LIFETIME_S
from tests.browser import chromium
from tests.conftest import make_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(fleet) -> dict[str, str]:
    return {role: fleet.add_user(f"page-{role}", role=role) for role in ("admin", "auditor", "member", "publisher")}


@pytest.fixture(scope="module")
async def browser():
    async with chromium() as running:
        yield running


@pytest.fixture
async def context(browser):
    made = await browser.new_context()
    yield made
    await made.close()


async def sign_in(context: BrowserContext, fleet, key: str) -> Page:
    page = await context.new_page()
    await page.goto(f"{fleet.base_url}/admin")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))
    await page.fill("#api_key", key)
    await page.click("#sign-in")
    return page


async def session_cookie(context: BrowserContext) -> dict | None:
    return next((c for c in await context.cookies() if c["name"] == COOKIE), None)


def get(fleet, path: str, cookie: str | None = None, **kwargs) -> httpx.Response:
    # Sent by hand: httpx, rightly, keeps Secure cookies off plain http.
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    return httpx.get(f"{fleet.base_url}{path}", headers=headers, timeout=30, **kwargs)


def post(fleet, path: str, cookie: str | None = None, **kwargs) -> httpx.Response:
    headers = {**kwargs.pop("headers", {}), **({"Cookie": f"{COOKIE}={cookie}"} if cookie else {})}
    return httpx.post(f"{fleet.base_url}{path}", headers=headers, timeout=30, **kwargs)


def signed_in(fleet, cookie: str) -> bool:
    answer = get(fleet, "/admin", cookie)
    return answer.status_code == 200 and 'name="csrf-token"' in answer.text


# -- signing in --------------------------------------------------------------------------------


async def test_admin_signs_in_with_a_secure_http_only_strict_cookie(fleet, keys, context):
    page = await sign_in(context, fleet, keys["admin"])
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    await expect(page.locator("#who")).to_have_text("default/page-admin")
    await expect(page.locator("#role")).to_have_text("admin")

    cookie = await session_cookie(context)
    assert cookie is not None
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert LIFETIME_S - 120 < cookie["expires"] - time.time() <= LIFETIME_S
    # The key itself is nowhere in what the browser keeps.
    secret = keys["admin"].rsplit("_", 1)[1]
    assert all(secret not in c["value"] for c in await context.cookies())
    assert await page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
    assert secret not in await page.content()


async def test_member_and_publisher_keys_cannot_sign_in(fleet, keys, context):
    for role in ("member", "publisher"):
        page = await sign_in(context, fleet, keys[role])
        await expect(page.locator("#error")).to_have_text("Only admins and auditors may use this page.")
        assert await session_cookie(context) is None
        await page.goto(f"{fleet.base_url}/admin")
        await expect(page).to_have_url(re.compile(r"/admin/login$"))


async def test_an_invalid_or_revoked_key_cannot_sign_in(fleet, context):
    page = await sign_in(context, fleet, "mcpf_000000000000_" + "x" * 43)
    await expect(page.locator("#error")).to_have_text("That key is not valid.")
    revoked = fleet.add_user("page-revoked-admin", role="admin")
    fleet.cli("keys", "revoke", revoked)
    page = await sign_in(context, fleet, revoked)
    await expect(page.locator("#error")).to_have_text("That key is not valid.")
    assert await session_cookie(context) is None


def test_the_login_form_needs_its_own_csrf_token(fleet, keys):
    # A login POST from elsewhere (login CSRF) lacks the token the form page set in its own cookie.
    answer = post(fleet, "/admin/login", data={"api_key": keys["admin"]}, follow_redirects=False)
    assert answer.status_code == 403
    assert COOKIE not in answer.headers.get("set-cookie", "")


def test_the_session_secret_is_kept_owner_only(fleet):
    path = fleet.home / "session-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) >= 32


# -- what ends a session -----------------------------------------------------------------------


async def test_a_cookie_no_longer_works_after_logout(fleet, keys, context):
    page = await sign_in(context, fleet, keys["admin"])
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    value = (await session_cookie(context))["value"]
    assert signed_in(fleet, value)

    await page.click("#logout")
    await expect(page).to_have_url(re.compile(r"/admin/login$"))
    assert await session_cookie(context) is None
    # The same value, replayed by hand, is refused too: the session's row has ended.
    assert not signed_in(fleet, value)
    assert get(fleet, "/admin", value, follow_redirects=False).headers["location"] == "/admin/login"


async def test_revoking_the_key_ends_the_session(fleet, context):
    key = fleet.add_user("page-admin-revoked-later", role="admin")
    page = await sign_in(context, fleet, key)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    value = (await session_cookie(context))["value"]
    assert signed_in(fleet, value)
    fleet.cli("keys", "revoke", key)
    assert not signed_in(fleet, value)
    await page.reload()
    await expect(page).to_have_url(re.compile(r"/admin/login$"))


async def test_a_demoted_user_loses_the_session(fleet, context):
    key = fleet.add_user("page-admin-demoted", role="admin")
    page = await sign_in(context, fleet, key)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    value = (await session_cookie(context))["value"]
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute("UPDATE users SET role = 'member' WHERE name = 'page-admin-demoted'")
    assert not signed_in(fleet, value)
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute("UPDATE users SET role = 'auditor' WHERE name = 'page-admin-demoted'")
    # An auditor may look again, within the same session.
    assert signed_in(fleet, value)


async def test_a_tampered_or_foreign_cookie_is_refused(fleet, keys, context):
    page = await sign_in(context, fleet, keys["admin"])
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    value = (await session_cookie(context))["value"]
    session_id, _, signature = value.partition(".")
    assert not signed_in(fleet, value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert not signed_in(fleet, "x" * len(session_id) + value[len(session_id):])
    assert not signed_in(fleet, session_id)


# -- CSRF --------------------------------------------------------------------------------------


async def test_unsafe_requests_need_the_csrf_token(fleet, keys, context):
    page = await sign_in(context, fleet, keys["admin"])
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    value = (await session_cookie(context))["value"]

    # The page's own browser, sending the cookie but no token: refused.
    status = await page.evaluate("""async () => (await fetch('/admin/logout', {method: 'POST'})).status""")
    assert status == 403
    wrong = await page.evaluate(
        """async () => (await fetch('/admin/logout', {method: 'POST', headers: {'X-CSRF-Token': 'nope'}})).status"""
    )
    assert wrong == 403
    answer = post(fleet, "/admin/logout", value, data={"csrf_token": token[:-1]}, follow_redirects=False)
    assert answer.status_code == 403
    assert signed_in(fleet, value)  # none of those signed anyone out

    # With the token the same request goes through.
    answer = post(fleet, "/admin/logout", value, data={"csrf_token": token}, follow_redirects=False)
    assert answer.status_code == 303
    assert not signed_in(fleet, value)


# -- the page ----------------------------------------------------------------------------------


def test_the_page_is_not_framable_and_runs_only_its_own_scripts(fleet, keys):
    answer = get(fleet, "/admin/login")
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert answer.headers["x-frame-options"] == "DENY"
    assert get(fleet, "/admin/static/admin.js").status_code == 200
