"""The admin console (/admin/console) in a real browser (Debian's chromium via Playwright) against a real gateway.

Navigation between the views; acting on them (approve with tier and tools, reject, hibernate,
resume and reclaim a real runsc sandbox, set and delete secrets in the embedded OpenBao through
the secrets API); every view paged, its full-page screenshot saved under the test's tmp dir and
its height bounded with many rows. Attacks: no session, a member's or publisher's key, an auditor
acting, a missing CSRF token, another tenant's versions and users, markup in the audit log.

Rows that only fill pages (90 versions, 60 users and keys, tool-call audit entries in a tenant of
their own) are written to the database directly: publishing 90 versions through sandboxes would
take an hour and prove nothing more about paging. Everything acted on goes through the gateway.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.browser import browser, context  # noqa: F401  (fixtures)
from tests.clients import connect
from tests.conftest import make_fleet
from tests.test_admin_page import cookie_value, get, login_by_hand, post, sign_in

BULK = "bulk"
# With its page full, no view may grow past these at these widths (the old page: 3,984 px for three versions).
SIZES = {(1280, 800): 1500, (800, 600): 2200}
VIEWS = ("versions?status=pending", "versions?status=approved", "versions?status=rejected", "drift", "users",
         "keys", "sandboxes", "audit", "usage", "tenants", "secrets")
TOOLS = [{"name": n, "description": f"Says {n}.", "inputSchema": {"type": "object", "properties": {}}} for n in ("hello", "bye")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(fleet) -> dict[str, str]:
    return {role: fleet.add_user(f"con-{role}", role=role) for role in ("admin", "auditor", "member", "publisher")}


@pytest.fixture(scope="module")
def bulk(fleet) -> str:
    """A tenant of many rows; returns its admin's key."""
    fleet.cli("tenants", "add", BULK)
    key = fleet.add_user("bulk-admin", tenant=BULK, role="admin")
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        tenant = conn.execute("SELECT id FROM tenants WHERE name = %s", (BULK,)).fetchone()[0]
        for i in range(60):
            user = conn.execute("INSERT INTO users (tenant_id, name) VALUES (%s, %s) RETURNING id", (tenant, f"u{i:02}")).fetchone()[0]
            conn.execute("INSERT INTO api_keys (user_id, prefix, secret_sha256) VALUES (%s, %s, %s)",
                         (user, f"bk{i:010}", hashlib.sha256(secrets.token_bytes(16)).digest()))
            conn.execute("INSERT INTO audit_entries (tenant, actor, action, target, outcome) VALUES (%s, %s, 'tool.call', 'hello', %s)",
                         (BULK, f"{BULK}/u{i:02}", "ok" if i % 3 else "tool error"))
        # Model asks of the router (core.models.usage's table): three of this tenant's, one of another's.
        for user_id, tenant_name, purpose in ((1, BULK, "tool"), (2, BULK, "sampling"), (3, BULK, "tool"), (1, "elsewhere", "tool")):
            conn.execute("INSERT INTO model_usage (day, user_id, tenant, server, purpose, model, asks, tokens_in, tokens_out, latency_ms)"
                         " VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s, 'weather', %s, 'gemma-3-270m', 2, 30, 40, 900)",
                         (user_id, tenant_name, purpose))
        for i in range(90):
            server = conn.execute("INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, %s, %s) RETURNING id",
                                  (tenant, f"io.bulk/s{i:02}", f"s{i:02}")).fetchone()[0]
            conn.execute(
                "INSERT INTO registry_versions (server_id, version, manifest, status, validation, tools, validated_at,"
                " decided_by) VALUES (%s, '1.0.0', '{}', %s, %s, %s, now(), %s)",
                (server, "passed" if i >= 30 else "rejected", json.dumps([{"check": "trial run", "ok": True, "detail": ""}]),
                 json.dumps(TOOLS), None if i >= 30 else "bulk-admin"),
            )
    return key


async def console(context: BrowserContext, fleet, key: str, view: str = "versions") -> Page:
    page = await sign_in(context, fleet, key)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    await page.goto(f"{fleet.base_url}/admin/console/{view}")
    return page


async def height(page: Page) -> int:
    return await page.evaluate("document.documentElement.scrollHeight")


def db(fleet, sql: str, *params):
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


# -- navigation and paging ---------------------------------------------------------------------


async def test_every_view_is_reached_from_the_navigation_paged_and_bounded(fleet, bulk, browser, tmp_path):  # noqa: F811
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = await console(context, fleet, bulk)
        heights = {}
        for label, view in (("Versions", "versions"), ("Drift", "drift"), ("Users", "users"), ("Keys", "keys"),
                            ("Sandboxes", "sandboxes"), ("Audit log", "audit"), ("Usage", "usage"),
                            ("Tenants", "tenants"), ("Secrets", "secrets")):
            await page.click(f"nav.console >> text={label}")
            await expect(page).to_have_url(re.compile(rf"/admin/console/{view}$"))
            await expect(page.locator(f"#nav-{view}")).to_have_attribute("aria-current", "page")
        for (width, tall), bound in SIZES.items():
            await page.set_viewport_size({"width": width, "height": tall})
            for view in VIEWS:
                await page.goto(f"{fleet.base_url}/admin/console/{view}")
                name = re.sub(r"\W+", "-", view)
                await page.screenshot(path=str(tmp_path / f"console-{name}-{width}.png"), full_page=True)
                heights[view, width] = await height(page)
            print(f"page heights at {width} px wide:", {v: h for (v, w), h in heights.items() if w == width})
            assert all(h < bound for (v, w), h in heights.items() if w == width), heights
        await page.set_viewport_size({"width": 1280, "height": 800})
        assert (tmp_path / "console-users-1280.png").stat().st_size > 10_000

        # 60 pending versions: six pages of 10 (each row carries its forms), no row on two pages.
        await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
        seen: list[str] = []
        for number in range(1, 7):
            await expect(page.locator("nav.pager span")).to_have_text(f"Page {number}")
            names = [await r.get_attribute("data-name") for r in await page.locator("tr.version").all()]
            assert len(names) == 10
            seen += names
            if number < 6:
                await page.click("#next")
        assert await page.locator("#next").count() == 0
        assert len(set(seen)) == 60
        await page.click("#prev")
        await expect(page.locator("nav.pager span")).to_have_text("Page 5")

        # The users (61), keys (61), audit and usage (60 user-days) views page too.
        for view, row in (("users", "tr.user"), ("keys", "tr.key"), ("audit", "tr.entry"), ("usage", "tr.usage-row")):
            await page.goto(f"{fleet.base_url}/admin/console/{view}")
            await expect(page.locator(row)).to_have_count(25)
            await page.click("#next")
            await expect(page.locator(row).first).to_be_visible()
            assert await height(page) < SIZES[1280, 800]
        await page.goto(f"{fleet.base_url}/admin/console/usage?page=3")
        await expect(page.locator("tr.usage-row")).to_have_count(10)
        await expect(page.locator("#model-usage")).to_be_visible()
        await expect(page.locator("tr.model-usage-row")).to_have_count(3)  # the other tenant's row is not shown
        await expect(page.locator("tr.model-usage-row").first).to_contain_text("gemma-3-270m")
    finally:
        await context.close()


# -- acting --------------------------------------------------------------------------------------


async def test_an_admin_approves_with_tier_and_tools_and_rejects(fleet, bulk, context, tmp_path):  # noqa: F811
    page = await console(context, fleet, bulk, "versions?status=pending")
    row = page.locator('tr.version[data-name="io.bulk/s89"]')
    await row.locator('input[name="tools"][value="bye"]').uncheck()
    await row.locator('select[name="tier"]').select_option("standard")
    await row.locator("button.approve-button").click()
    await expect(page).to_have_url(re.compile(r"/admin/console/versions\?status=approved&notice=approved$"))
    await expect(page.locator("#status")).to_have_text("Approved.")
    await expect(page.locator('tr.version[data-name="io.bulk/s89"]')).to_contain_text("tenant, tier standard, tools hello by bulk-admin")
    await page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)
    assert db(fleet, "SELECT a.tier, a.tools, a.approved_by FROM approvals a JOIN registry_servers s ON s.id = a.server_id"
                     " WHERE s.name = 'io.bulk/s89' AND a.revoked_at IS NULL") == [("standard", ["hello"], "bulk-admin")]

    await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
    row = page.locator('tr.version[data-name="io.bulk/s88"]')
    await row.locator('input[name="reason"]').fill("not needed here")
    await row.locator("button.reject-button").click()
    await expect(page).to_have_url(re.compile(r"status=rejected&notice=rejected$"))
    await expect(page.locator('tr.version[data-name="io.bulk/s88"]')).to_contain_text("rejected by bulk-admin: not needed here")
    assert db(fleet, "SELECT v.status FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
                     " WHERE s.name = 'io.bulk/s88'") == [("rejected",)]

    # Approving a rejected version is refused with the registry's own words.
    token = await page.locator('meta[name="csrf-token"]').get_attribute("content")
    status = await page.evaluate(
        """async (token) => (await fetch('/admin/console/versions/approve', {method: 'POST',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'},
             body: new URLSearchParams({csrf_token: token, name: 'io.bulk/s88', version: '1.0.0'})})).status""", token)
    assert status == 409

    # A drifted definition of the approved version (written as the gateway's drift check writes one,
    # seen in one user's sandbox) is accepted on the drift view.
    live = "a" * 64
    db(fleet, "WITH d AS (INSERT INTO tool_drift (version_id, tool, pinned_sha256, live_sha256, live_definition)"
              " SELECT v.id, 'hello', %s, %s, '{}' FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
              " WHERE s.name = 'io.bulk/s89' RETURNING id, version_id)"
              " INSERT INTO tool_drift_sightings (drift_id, user_id, version_id)"
              " SELECT d.id, u.id, d.version_id FROM d, users u WHERE u.name = 'u07'", "b" * 64, live)
    await page.goto(f"{fleet.base_url}/admin/console/drift")
    drift = page.locator("tr.drift")
    await expect(drift).to_have_count(1)
    await expect(drift).to_contain_text("io.bulk/s89")
    await drift.locator("button").click()
    await expect(page.locator("#status")).to_have_text("The drifted definition is accepted.")
    await expect(page.locator("tr.drift")).to_have_count(0)
    assert db(fleet, "SELECT tool, sha256, accepted_by FROM accepted_definitions") == [("hello", live, "bulk-admin")]

    # The three decisions are in the audit log, found with its filter.
    await page.goto(f"{fleet.base_url}/admin/console/audit")
    await page.fill('input[name="action"]', "registry.")
    await page.fill('input[name="actor"]', "bulk-admin")
    await page.click("#filter")
    entries = page.locator("tr.entry")
    await expect(entries).to_have_count(3)
    await expect(entries.nth(0)).to_contain_text("registry.accept_drift")
    await expect(entries.nth(1)).to_contain_text("registry.reject")
    await expect(entries.nth(2)).to_contain_text("registry.approve")


async def test_an_admin_hibernates_resumes_and_reclaims_a_sandbox(fleet, keys, context, tmp_path):  # noqa: F811
    # The member's first session starts their sandbox (runsc), with the built-in servers.
    async with connect(fleet.mcp_url, keys["member"]) as client:
        assert (await client.list_tools()).tools
    state = "SELECT b.state FROM sandboxes b JOIN users u ON u.id = b.user_id WHERE u.name = 'con-member' ORDER BY b.updated_at DESC LIMIT 1"
    assert db(fleet, state) == [("Running",)]

    page = await console(context, fleet, keys["admin"], "sandboxes")
    row = page.locator('tr.sandbox[data-user="con-member"]')
    await expect(row.locator(".state")).to_have_text("Running")
    await expect(row.locator("button.resume")).to_have_count(0)
    await page.screenshot(path=str(tmp_path / "sandboxes-running.png"), full_page=True)
    for action, after in (("hibernate", "Hibernated"), ("resume", "Running")):
        await row.locator(f"button.{action}").click()
        await expect(page.locator("#status")).to_have_text("Done.", timeout=200_000)
        await expect(row.locator(".state")).to_have_text(after)
        assert db(fleet, state) == [(after,)]
    await row.locator("button.reclaim").click()
    await expect(page.locator("#status")).to_have_text("Done.", timeout=200_000)
    await expect(row).to_have_count(0)  # the live list no longer holds it
    assert db(fleet, state) == [("Reclaimed",)]
    await page.goto(f"{fleet.base_url}/admin/console/users/con-member")
    await expect(page.locator("#user-sandbox")).to_have_text("Reclaimed")
    # Through the same requests as the CLI, and audited with the admin's name.
    assert [r[0] for r in db(fleet, "SELECT action FROM sandbox_requests WHERE requested_by = 'console:default/con-admin' ORDER BY id")] == [
        "hibernate", "resume", "reclaim"]
    assert [r[0] for r in db(fleet, "SELECT action FROM audit_entries WHERE action LIKE 'console.sandbox.%%' AND actor = 'con-admin'"
                                    " ORDER BY id")] == ["console.sandbox.hibernate", "console.sandbox.resume", "console.sandbox.reclaim"]


async def test_secrets_are_set_and_deleted_by_name_and_never_shown(fleet, keys, context):  # noqa: F811
    shared, own, members = (f"value-{secrets.token_hex(12)}" for _ in range(3))
    # The member sets one of their own through the API: the console names it, nothing more.
    # None of these servers is approved in this tenant: each is set ahead of approval (force).
    answer = httpx.put(f"{fleet.base_url}/api/secrets/io.example/jira/JIRA_TOKEN?force=1", json={"value": members},
                       headers={"Authorization": f"Bearer {keys['member']}"}, timeout=60)
    assert answer.status_code == 200, answer.text

    page = await console(context, fleet, keys["admin"], "secrets")
    form = page.locator("form.secret-set")
    await form.locator('input[name="server"]').fill("io.example/github")
    await form.locator('input[name="name"]').fill("GITHUB_TOKEN")
    await form.locator('input[name="value"]').fill(shared)
    await form.locator("button").click()
    await expect(page.locator("#status")).to_contain_text(
        "Not set: no approved server of tenant default declares a secret GITHUB_TOKEN for io.example/github")
    await form.locator('input[name="value"]').fill(shared)
    await form.locator('input[name="force"]').check()
    await form.locator("button").click()
    await expect(page.locator("table.secrets")).to_contain_text("GITHUB_TOKEN")
    assert shared not in await page.content()
    listed = httpx.get(f"{fleet.base_url}/api/secrets", headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=60).json()
    assert [(s["server"], s["name"]) for s in listed["tenant"]] == [("io.example/github", "GITHUB_TOKEN")]

    # The admin's own secrets are on their own user page.
    await page.goto(f"{fleet.base_url}/admin/console/users/con-admin")
    form = page.locator("form.secret-set")
    await form.locator('input[name="server"]').fill("io.example/weather")
    await form.locator('input[name="name"]').fill("API_KEY")
    await form.locator('input[name="value"]').fill(own)
    await form.locator('input[name="force"]').check()
    await form.locator("button").click()
    await expect(page.locator("table.secrets")).to_contain_text("API_KEY")
    assert own not in await page.content()
    listed = httpx.get(f"{fleet.base_url}/api/secrets", headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=60).json()
    assert [(s["server"], s["name"], s["user"]) for s in listed["secrets"]] == [("io.example/weather", "API_KEY", "con-admin")]

    # Another user's page names their secrets and offers no way to change them.
    await page.goto(f"{fleet.base_url}/admin/console/users/con-member")
    await expect(page.locator("table.secrets")).to_contain_text("JIRA_TOKEN")
    await expect(page.locator("form.secret-set")).to_have_count(0)
    await expect(page.locator("button.secret-delete")).to_have_count(0)
    assert members not in await page.content()

    # Deleted from the secrets view.
    await page.goto(f"{fleet.base_url}/admin/console/secrets")
    await page.locator("button.secret-delete").click()
    await expect(page.locator("table.secrets")).to_contain_text("No secrets.")
    listed = httpx.get(f"{fleet.base_url}/api/secrets", headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=60).json()
    assert listed["tenant"] == []


# -- attacks -------------------------------------------------------------------------------------


ACTIONS = ("versions/approve", "versions/reject", "versions/add", "drift/accept", "sandboxes/hibernate", "sandboxes/resume", "sandboxes/reclaim")


def all_views() -> list[str]:
    return ["", *VIEWS, "users/con-admin"]


def test_no_one_but_a_signed_in_admin_or_auditor_sees_a_view(fleet, keys):
    for role in ("member", "publisher", "admin"):
        for view in all_views():
            # A key is no session: not even an admin's opens the console without signing in.
            answer = get(fleet, f"/admin/console/{view}".rstrip("/"), headers_extra={"Authorization": f"Bearer {keys[role]}"},
                         follow_redirects=False)
            assert answer.status_code == 403, (role, view, answer.status_code)
            assert "csrf" not in answer.text
        for action in ACTIONS:
            answer = post(fleet, f"/admin/console/{action}", headers={"Authorization": f"Bearer {keys[role]}"},
                          data={"name": "io.bulk/s02", "version": "1.0.0", "user_id": "1", "id": "1"})
            assert answer.status_code == 403, (role, action)
    # A member or publisher cannot turn their key into a session at all.
    for role in ("member", "publisher"):
        assert login_by_hand(fleet, keys[role]).status_code == 403
    # A forged cookie is no session either.
    assert get(fleet, "/admin/console/users", cookie="forged.value.sig").status_code == 403


def test_an_auditor_reads_but_cannot_act(fleet, keys, bulk):
    cookie = cookie_value(login_by_hand(fleet, keys["auditor"]))
    assert get(fleet, "/admin/console", cookie=cookie).headers["location"] == "/admin/console/versions"
    for view in all_views()[1:]:
        answer = get(fleet, f"/admin/console/{view}", cookie=cookie)
        assert answer.status_code == 200, (view, answer.text[:300])
    token = re.search(r'name="csrf-token" content="([^"]+)"', get(fleet, "/admin/console/users", cookie=cookie).text).group(1)
    member = db(fleet, "SELECT id FROM users WHERE name = 'con-member'")[0][0]
    for action in ACTIONS:
        answer = post(fleet, f"/admin/console/{action}", cookie=cookie,
                      data={"csrf_token": token, "name": "io.example/weather", "version": "1.0.0", "user_id": str(member), "id": "1"})
        assert answer.status_code == 403, action
        assert "may read the console but not act" in answer.text
    assert db(fleet, "SELECT count(*) FROM sandbox_requests WHERE requested_by LIKE 'console:default/con-auditor'") == [(0,)]


def test_an_admin_acts_only_with_the_csrf_token_and_only_in_their_tenant(fleet, keys, bulk):
    cookie = cookie_value(login_by_hand(fleet, keys["admin"]))
    token = re.search(r'name="csrf-token" content="([^"]+)"', get(fleet, "/admin/console/users", cookie=cookie).text).group(1)
    # Without the token (or with another), nothing is done.
    for sent in ({}, {"csrf_token": "wrong"}):
        answer = post(fleet, "/admin/console/versions/reject", cookie=cookie, data={**sent, "name": "io.bulk/s33", "version": "1.0.0"})
        assert answer.status_code == 403
        answer = post(fleet, "/admin/console/versions/add", cookie=cookie, data={**sent, "source": "pypi:mcpfleet-never-added"})
        assert answer.status_code == 403
    # Another tenant's versions are neither shown nor decided; its users' sandboxes are out of reach.
    assert "io.bulk/" not in get(fleet, "/admin/console/versions?status=pending", cookie=cookie).text
    for action in ("versions/approve", "versions/reject"):
        answer = post(fleet, f"/admin/console/{action}", cookie=cookie, data={"csrf_token": token, "name": "io.bulk/s33", "version": "1.0.0"})
        assert answer.status_code == 404, answer.text
    assert db(fleet, "SELECT v.status FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
                     " WHERE s.name = 'io.bulk/s33'") == [("passed",)]
    stranger = db(fleet, "SELECT u.id FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = %s AND u.name = 'u03'", BULK)[0][0]
    answer = post(fleet, "/admin/console/sandboxes/reclaim", cookie=cookie, data={"csrf_token": token, "user_id": str(stranger)})
    assert answer.status_code == 404
    assert db(fleet, "SELECT count(*) FROM sandbox_requests WHERE user_id = %s", stranger) == [(0,)]
    assert get(fleet, "/admin/console/users/u03", cookie=cookie).status_code == 404
    for view in ("users", "keys", "audit", "usage"):
        assert "bulk/" not in get(fleet, f"/admin/console/{view}", cookie=cookie).text.replace("/admin/console", "")


async def test_markup_in_the_audit_log_is_shown_as_text(fleet, keys, context):  # noqa: F811
    db(fleet, "INSERT INTO audit_entries (tenant, actor, action, target, outcome, detail) VALUES"
              " ('default', '<b id=actor-injected>x</b>', 'test.markup', '<img src=x id=injected onerror=alert(1)>', 'ok',"
              " '{\"note\": \"<script id=script-injected>alert(1)</script>\"}')")
    page = await console(context, fleet, keys["admin"], "audit?action=test.markup")
    await expect(page.locator("tr.entry")).to_have_count(1)
    await expect(page.locator("tr.entry")).to_contain_text("<img src=x id=injected")
    for injected in ("#injected", "#actor-injected", "#script-injected"):
        await expect(page.locator(injected)).to_have_count(0)


async def test_the_audit_chain_is_verified_and_the_tenants_log_exported(fleet, keys, bulk, context):  # noqa: F811
    page = await console(context, fleet, keys["admin"], "audit")
    await page.click("#verify")
    await expect(page.locator("#verified")).to_have_text("The audit chain is intact.")
    exported = await page.evaluate("async () => await (await fetch('/admin/console/audit/export')).text()")
    lines = [json.loads(line) for line in exported.splitlines()]
    assert {e["tenant"] for e in lines} == {"default"}  # the bulk tenant's entries stay its own
    ids = [e["id"] for e in lines]
    assert ids == sorted(ids) and all(len(e["hash"]) == 64 for e in lines)
    assert len(lines) >= db(fleet, "SELECT count(*) FROM audit_entries WHERE tenant = 'default' AND id <= %s", ids[-1])[0][0]
    # A changed entry breaks the chain, and the console says where.
    db(fleet, "ALTER TABLE audit_entries DISABLE TRIGGER USER")
    try:
        db(fleet, "UPDATE audit_entries SET outcome = 'forged' WHERE id = %s", ids[0])
    finally:
        db(fleet, "ALTER TABLE audit_entries ENABLE TRIGGER USER")
    await page.click("#verify")
    await expect(page.locator("#verified")).to_contain_text(f"The chain is broken at entry {ids[0]}: hash mismatch")


# -- adding from an index, times (diffs: tests/test_console_views.py) --------------------------------------------------------

async def test_an_admin_adds_a_server_from_pypi_by_name(fleet, keys, context, tmp_path):  # noqa: F811
    """Through the same code as `POST /registry/v1/add`: a source that is not one, and a package
    PyPI does not have, are refused in the registry's own words; the official `mcp-server-time`
    (real PyPI; tens of seconds) becomes a pending version."""
    page = await console(context, fleet, keys["admin"], "versions?status=pending")
    await page.fill('#add input[name="source"]', "gopher:time")
    await page.click("#add-button")
    await expect(page.locator("#error")).to_contain_text("the source 'gopher:time' must read pypi:NAME")
    await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
    await page.fill('#add input[name="source"]', "pypi:mcpfleet-no-such-package-xyz==1.0")
    await page.click("#add-button")
    await expect(page.locator("#error")).to_contain_text("mcpfleet-no-such-package-xyz==1.0 has no wheel pip can download",
                                                         timeout=120_000)
    assert not db(fleet, "SELECT 1 FROM registry_servers WHERE name LIKE %s", "%no-such-package%")

    await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
    await page.fill('#add input[name="source"]', "pypi:mcp-server-time==2026.10.19")
    await page.click("#add-button")
    await expect(page).to_have_url(re.compile(r"status=pending&notice=added$"), timeout=600_000)
    await expect(page.locator("#status")).to_have_text("Added: the new version is pending while it is validated.")
    row = page.locator('tr.version[data-name="io.pypi/mcp-server-time"][data-version="2026.10.19"]')
    await expect(row).to_have_count(1)
    await page.screenshot(path=str(tmp_path / "added.png"), full_page=True)
    published_by = db(fleet, "SELECT u.name FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
                             " JOIN users u ON u.id = v.published_by WHERE s.name = 'io.pypi/mcp-server-time'")
    assert published_by == [("con-admin",)]



TIME_ELEMENT = re.compile(r'<time datetime="(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)" title="([^"]+)">([^<]+)</time>')


async def test_every_time_is_written_in_utc_and_shown_in_the_browsers_zone(fleet, keys, bulk, browser):  # noqa: F811
    # As sent: every time of every view is one <time> element holding the UTC instant, with UTC text,
    # and no time of day appears anywhere else on the page.
    for key in (keys["admin"], bulk):
        cookie = cookie_value(login_by_hand(fleet, key))
        for view in all_views()[1:]:
            html = get(fleet, f"/admin/console/{view}", cookie=cookie).text
            found = TIME_ELEMENT.findall(html)
            assert found, view  # the header's "signed in until" at least
            for instant, title, text in found:
                expected = datetime.fromisoformat(instant).strftime("%Y-%m-%d %H:%M:%S UTC")
                assert title == text == expected, (view, instant, title, text)
            assert not re.search(r"\d\d:\d\d:\d\d", TIME_ELEMENT.sub("", html)), view

    # Shown: a browser in Tokyo sees Tokyo's time, named, for the same instant.
    tokyo = await browser.new_context(timezone_id="Asia/Tokyo")
    try:
        page = await console(tokyo, fleet, bulk, "audit")
        times = page.locator("tr.entry time")
        await expect(times.first).to_have_class(re.compile(r"\blocal\b"))
        count = await times.count()
        assert count > 0
        for i in range(min(count, 5)):
            element = times.nth(i)
            instant = datetime.fromisoformat(await element.get_attribute("datetime"))
            local = instant.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S Asia/Tokyo")
            await expect(element).to_have_text(local)
            assert (await element.get_attribute("title")).endswith(" UTC")
    finally:
        await tokyo.close()
