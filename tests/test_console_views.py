"""The admin console's views as they look and what they measure, in Debian's chromium against a real gateway.

Screenshots: every view of a tenant of fixed content ("shots": fixed names, key prefixes, versions,
counts), taken at two sizes and compared with the reference images under tests/screenshots/
(tests/screenshots.py: a per-pixel threshold, a largest share of differing pixels, times and audit
ids masked). A failing comparison writes the shot and a diff image under the test's tmp dir and
names them; MCPFLEET_UPDATE_SCREENSHOTS=1 writes new references. A changed style sheet, injected
in the test, must fail the comparison. The shots tenant's rows are written to the database directly
(as publishing, approving and tool calls leave them), since what is shown is what the rows hold;
its one sandbox row is a docker-backend row standing in for a hibernated sandbox (a real one's
memory and times would vary from run to run).

Memory: a real runsc sandbox's live PSS on the Sandboxes view and in `mcpfleet sandboxes list`.
Diffs: a pending version's prompts, resources and instructions marked as its tools are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from sandbox.backends.runsc import descendant_pids, runsc_processes
from tests.browser import ARGS, CHROMIUM, require_chromium
from tests.clients import connect
from tests.conftest import MCPFLEET, make_fleet
from tests.screenshots import FONTS_CONF, compare, renderer_mismatch
from tests.test_admin_page import sign_in

SHOTS = "shots"
ADMIN_PREFIX = "5a075a075a07"
SIZES = ((1280, 800), (800, 600))
VIEWS = ("versions?status=pending", "versions?status=approved", "versions?status=rejected", "drift", "users", "keys",
         "sandboxes", "audit?action=tool.call", "usage", "tenants", "secrets")
# What differs from run to run however fixed the rows are: times (and the usage view's days), audit ids.
MASKED = "time, tr.usage-row td:first-child, tr.model-usage-row td:first-child, tr.entry td:first-child"
HELLO_BYE = [{"name": n, "description": f"Says {n}.", "inputSchema": {"type": "object", "properties": {}}} for n in ("hello", "bye")]
TOOL = {"name": "list", "description": "Lists the notes.", "inputSchema": {"type": "object", "properties": {}}}
CHANGED_TOOL = {**TOOL, "description": "Lists the notes, newest first."}
OFFERINGS_BEFORE = {
    "prompts": [{"name": "summarise", "description": "Summarise the notes."},
                {"name": "retired", "description": "Goes away."}],
    "resources": [{"uri": "notes://all", "name": "all", "description": "Every note.", "mimeType": "text/plain"}],
    "instructions": "Use list first.",
}
OFFERINGS_AFTER = {
    "prompts": [{"name": "summarise", "description": "Summarise the notes."},
                {"name": "triage", "description": "Sort the notes by urgency."}],
    "resources": [{"uri": "notes://all", "name": "all", "description": "Every note.", "mimeType": "text/markdown"}],
    "instructions": "Use list first, then read.",
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


def db(fleet, sql: str, *params):
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def version(fleet, server: int, number: str, tools: list, offerings: dict, *, status: str = "passed",
            validation: list | None = None, decided: tuple[str, str] | None = None) -> int:
    checks = validation or [{"check": "trial run", "ok": True, "detail": ""}]
    return db(fleet, "INSERT INTO registry_versions (server_id, version, manifest, status, validation, tools, offerings,"
                     " validated_at, decided_by, decision_reason) VALUES (%s, %s, '{}', %s, %s, %s, %s, now(), %s, %s) RETURNING id",
              server, number, status, json.dumps(checks), json.dumps(tools), json.dumps(offerings),
              decided[0] if decided else None, decided[1] if decided else None)[0][0]


@pytest.fixture(scope="module")
def shots(fleet) -> str:
    """The tenant of fixed content; returns its admin's key (whose prefix is fixed too)."""
    fleet.cli("tenants", "add", SHOTS)
    made = fleet.add_user("shots-admin", tenant=SHOTS, role="admin")
    _, prefix, secret = made.split("_", 2)
    db(fleet, "UPDATE api_keys SET prefix = %s WHERE prefix = %s", ADMIN_PREFIX, prefix)
    tenant = db(fleet, "SELECT id FROM tenants WHERE name = %s", SHOTS)[0][0]
    users = {}
    for i, (name, role) in enumerate((("ana", "member"), ("ben", "publisher"), ("cleo", "auditor"))):
        users[name] = db(fleet, "INSERT INTO users (tenant_id, name, role) VALUES (%s, %s, %s) RETURNING id", tenant, name, role)[0][0]
        db(fleet, "INSERT INTO api_keys (user_id, prefix, secret_sha256) VALUES (%s, %s, %s)",
           users[name], f"5a07000000{i:02}", hashlib.sha256(name.encode()).digest())
    servers = {name: db(fleet, "INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, %s, %s) RETURNING id",
                        tenant, f"io.shots/{name}", name)[0][0] for name in ("notes", "files", "old")}
    approved = version(fleet, servers["notes"], "1.0.0", [TOOL], OFFERINGS_BEFORE)
    db(fleet, "INSERT INTO approvals (version_id, server_id, pins, approved_by) VALUES (%s, %s, '{}', 'shots-admin')",
       approved, servers["notes"])
    version(fleet, servers["notes"], "1.1.0", [CHANGED_TOOL], OFFERINGS_AFTER)
    version(fleet, servers["files"], "0.3.0", [TOOL], {}, status="failed",
            validation=[{"check": "trial run", "ok": True, "detail": ""}, {"check": "scan", "ok": False, "detail": "eval"}])
    version(fleet, servers["old"], "2.0.0", [TOOL], {}, status="rejected", decided=("shots-admin", "superseded by notes"))
    drift = db(fleet, "INSERT INTO tool_drift (version_id, tool, pinned_sha256, live_sha256, live_definition)"
                      " VALUES (%s, 'list', %s, %s, '{}') RETURNING id", approved, "ab" * 32, "cd" * 32)[0][0]
    db(fleet, "INSERT INTO tool_drift_sightings (drift_id, user_id, version_id) VALUES (%s, %s, %s)", drift, users["ana"], approved)
    for actor, outcome in (("ana", "ok"), ("ana", "ok"), ("ben", "tool error")):
        db(fleet, "INSERT INTO audit_entries (tenant, actor, action, target, outcome) VALUES (%s, %s, 'tool.call', 'notes__list', %s)",
           SHOTS, f"{SHOTS}/{actor}", outcome)
    db(fleet, "INSERT INTO model_usage (day, user_id, tenant, server, purpose, model, asks, tokens_in, tokens_out, latency_ms)"
              " VALUES ((now() AT TIME ZONE 'UTC')::date, %s, %s, 'io.shots/notes', 'tool', 'gemma-3-270m', 3, 120, 80, 2400)",
       users["ana"], SHOTS)
    # Stands in for a hibernated sandbox: a docker-backend row, which this (runsc) gateway's manager never touches.
    db(fleet, "INSERT INTO sandboxes (id, user_id, backend, state, tier, checkpoint_bytes) VALUES"
              " ('shots-ana', %s, 'docker', 'Hibernated', 'standard', %s)", users["ana"], 42 * 2**20)
    key = f"mcpf_{ADMIN_PREFIX}_{secret}"
    answer = httpx.put(f"{fleet.base_url}/api/tenant-secrets/io.shots/notes/NOTES_TOKEN?force=1", json={"value": "v" * 16},
                       headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    return key


@pytest.fixture(scope="module")
def default_admin(fleet) -> str:
    return fleet.add_user("diff-admin", role="admin")


@pytest.fixture(scope="module")
async def shot_browser() -> AsyncIterator[Browser]:
    """Chromium seeing only the fonts of tests/screenshots/fonts.conf."""
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, "--force-color-profile=srgb",
                                                   "--font-render-hinting=none"], headless=True,
                                                   env={**os.environ, "FONTCONFIG_FILE": str(FONTS_CONF)})
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def shooting(browser: Browser, fleet, key: str, size: tuple[int, int], *, bypass_csp: bool = False) -> AsyncIterator[Page]:
    context: BrowserContext = await browser.new_context(
        viewport={"width": size[0], "height": size[1]}, device_scale_factor=1, timezone_id="UTC", locale="en-US",
        color_scheme="light", reduced_motion="reduce", bypass_csp=bypass_csp)
    try:
        page = await sign_in(context, fleet, key)
        await expect(page).to_have_url(f"{fleet.base_url}/admin")
        yield page
    finally:
        await context.close()


async def shoot(page: Page) -> bytes:
    return await page.screenshot(full_page=True, animations="disabled", caret="hide", mask=[page.locator(MASKED)])


def slug(view: str, size: tuple[int, int]) -> str:
    return f"console-{re.sub(r'[^a-z]+', '-', view).strip('-')}-{size[0]}x{size[1]}"


# -- screenshots ---------------------------------------------------------------------------------


async def test_every_view_matches_its_reference_at_two_sizes(fleet, shots, shot_browser, tmp_path):
    if (mismatch := renderer_mismatch(CHROMIUM)) is not None:
        pytest.skip(mismatch)
    failed, shown = [], []
    for size in SIZES:
        async with shooting(shot_browser, fleet, shots, size) as page:
            for view in VIEWS:
                await page.goto(f"{fleet.base_url}/admin/console/{view}")
                await expect(page.locator("nav.console")).to_be_visible()
                result = compare(slug(view, size), await shoot(page), tmp_path)
                shown.append(f"{result.name}: {result.message}")
                if not result.matches:
                    failed.append(result.message)
    print("\n".join(shown))
    assert not failed, "\n".join(failed)


async def test_a_changed_style_fails_the_comparison_and_leaves_the_shot_and_a_diff(fleet, shots, shot_browser, tmp_path):
    size, view = SIZES[0], "versions?status=pending"
    # The console's CSP refuses inline styles: the test injects one past it (bypass_csp), as a changed style sheet.
    async with shooting(shot_browser, fleet, shots, size, bypass_csp=True) as page:
        await page.goto(f"{fleet.base_url}/admin/console/{view}")
        # The reference is this run's own shot, so the check holds on any renderer.
        references = tmp_path / "references"
        compare(slug(view, size), await shoot(page), tmp_path, update=True, references=references)
        assert compare(slug(view, size), await shoot(page), tmp_path / "same", update=False, references=references).matches
        for name, css in (("colour", "header { background: #6d2a2a !important; }"),
                          ("spacing", "td { padding-left: 0.7rem !important; }")):
            await page.add_style_tag(content=css)
            result = compare(slug(view, size), await shoot(page), tmp_path / name, update=False, references=references)
            assert not result.matches, (name, result.message)
            assert result.actual and result.actual.exists() and result.diff and result.diff.exists()
            assert str(result.actual) in result.message and str(result.diff) in result.message
            print(f"{name}: {result.message}")
            await page.reload()


# -- diffs ---------------------------------------------------------------------------------------


async def test_a_pending_versions_prompts_resources_and_instructions_are_marked_as_changed(fleet, shots, shot_browser):
    async with shooting(shot_browser, fleet, shots, SIZES[0]) as page:
        await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
        row = page.locator('tr.version[data-name="io.shots/notes"][data-version="1.1.0"]')
        await expect(row.locator(".diff")).to_have_attribute("data-against", "1.0.0")
        await expect(row.locator('.tool-change[data-tool="list"]')).to_have_attribute("data-change", "changed")
        changes = row.locator(".offering-change")
        await expect(changes).to_have_count(4)
        expected = {("prompt", "triage"): "added", ("prompt", "retired"): "removed",
                    ("resource", "notes://all"): "changed", ("instructions", "instructions"): "changed"}
        for (kind, name), change in expected.items():
            await expect(row.locator(f'.offering-change[data-kind="{kind}"][data-name="{name}"]')).to_have_attribute("data-change", change)
        resource = row.locator('.offering-change[data-kind="resource"]')
        await expect(resource.locator("summary")).to_have_text("mimeType")
        await resource.locator("summary").click()
        await expect(resource.locator('.field[data-field="mimeType"] del')).to_have_text("text/plain")
        await expect(resource.locator('.field[data-field="mimeType"] ins')).to_have_text("text/markdown")
        instructions = row.locator('.offering-change[data-kind="instructions"]')
        await instructions.locator("summary").click()
        await expect(instructions.locator("ins")).to_have_text("Use list first, then read.")
        await expect(row.locator(".unchanged-offerings")).to_have_text("unchanged: prompt summarise")
        # The registry API's view of the same version says the same (one diff for both).
        api = httpx.get(f"{fleet.base_url}/registry/v1/servers/io.shots/notes/versions/1.1.0",
                        headers={"Authorization": f"Bearer {shots}"}, timeout=60).json()
        assert {(d["kind"], d["name"]): d["change"] for d in api["diff"]["offerings"] if d["change"] != "same"} == expected
        assert next(d for d in api["diff"]["offerings"] if d["kind"] == "resource")["fields"] == ["mimeType"]


async def test_a_pending_version_is_shown_as_what_changed_since_the_approved_one(fleet, default_admin, shot_browser):
    """Versions written to the database as publishing leaves them (what is compared is the stored
    definitions); the diff is computed by the same code as the registry API's version view."""
    tenant = db(fleet, "SELECT id FROM tenants WHERE name = 'default'")[0][0]
    server = db(fleet, "INSERT INTO registry_servers (tenant_id, name, prefix) VALUES (%s, 'io.con/diffed', 'diffed') RETURNING id",
                tenant)[0][0]
    changed = [{"name": "hello", "description": "Says hello, louder.",
                "inputSchema": {"type": "object", "properties": {"loud": {"type": "boolean"}}}},
               {"name": "wave", "description": "Waves.", "inputSchema": {"type": "object", "properties": {}}}]
    ids = {}
    for number, tools in (("1.0.0", HELLO_BYE), ("1.1.0", changed)):
        ids[number] = db(fleet, "INSERT INTO registry_versions (server_id, version, manifest, status, validation, tools, validated_at)"
                                 " VALUES (%s, %s, '{}', 'passed', %s, %s, now()) RETURNING id",
                          server, number, json.dumps([{"check": "trial run", "ok": True, "detail": ""}]), json.dumps(tools))[0][0]
    db(fleet, "INSERT INTO approvals (version_id, server_id, pins, approved_by) VALUES (%s, %s, '{}', 'diff-admin')", ids["1.0.0"], server)

    context = await shot_browser.new_context()
    page = await sign_in(context, fleet, default_admin)
    await expect(page).to_have_url(f"{fleet.base_url}/admin")
    await page.goto(f"{fleet.base_url}/admin/console/versions?status=pending")
    row = page.locator('tr.version[data-name="io.con/diffed"]')
    await expect(row.locator(".diff")).to_have_attribute("data-against", "1.0.0")
    await expect(row.locator(".tool-change")).to_have_count(3)
    await expect(row.locator('.tool-change[data-tool="wave"]')).to_have_attribute("data-change", "added")
    await expect(row.locator('.tool-change[data-tool="bye"]')).to_have_attribute("data-change", "removed")
    hello = row.locator('.tool-change[data-tool="hello"]')
    await expect(hello).to_have_attribute("data-change", "changed")
    await expect(hello.locator("summary")).to_have_text("description, inputSchema")
    await hello.locator("summary").click()
    await expect(hello.locator('.field[data-field="description"] del')).to_have_text("Says hello.")
    await expect(hello.locator('.field[data-field="description"] ins')).to_have_text("Says hello, louder.")
    await expect(hello.locator('.field[data-field="inputSchema"] ins')).to_contain_text('"loud"')

    # Once 1.1.0 is approved there is nothing to compare it with on the pending view; a 1.2.0 with the
    # same tools as 1.1.0 is compared with 1.1.0 (the newest approved) and shows no change.
    db(fleet, "UPDATE approvals SET revoked_at = now(), revoked_by = 'diff-admin' WHERE server_id = %s", server)
    db(fleet, "INSERT INTO approvals (version_id, server_id, pins, approved_by) VALUES (%s, %s, '{}', 'diff-admin')", ids["1.1.0"], server)
    db(fleet, "INSERT INTO registry_versions (server_id, version, manifest, status, validation, tools, validated_at)"
              " VALUES (%s, '1.2.0', '{}', 'passed', '[]', %s, now())", server, json.dumps(changed))
    await page.reload()
    row = page.locator('tr.version[data-name="io.con/diffed"][data-version="1.2.0"]')
    await expect(row.locator(".diff")).to_have_attribute("data-against", "1.1.0")
    await expect(row.locator(".no-change")).to_have_text("no tool changed")
    await expect(row.locator(".unchanged")).to_have_text("unchanged: hello, wave")
    await context.close()


# -- memory --------------------------------------------------------------------------------------


def rss_bytes(root: Path, sandbox_id: str) -> int:
    """The resident set of the sandbox's runsc processes, read here on its own: PSS can never exceed it."""
    found = [pid for pid, argv in runsc_processes(root) if any(sandbox_id in arg for arg in argv)]
    total = 0
    for pid in set(found + [child for parent in found for child in descendant_pids(parent)]):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return total


async def test_a_running_sandboxs_memory_is_shown_live_and_other_backends_say_na(fleet, shots, shot_browser):
    key = fleet.add_user("mem-user")
    admin = fleet.add_user("mem-admin", role="admin")
    async with connect(fleet.mcp_url, key) as client:
        assert (await client.list_tools()).tools
    [(sandbox_id,)] = db(fleet, "SELECT b.id FROM sandboxes b JOIN users u ON u.id = b.user_id"
                                " WHERE u.name = 'mem-user' AND b.state = 'Running'")
    rss = rss_bytes(fleet.home / "runsc", sandbox_id)
    context = await shot_browser.new_context()
    try:
        page = await sign_in(context, fleet, admin)
        await expect(page).to_have_url(f"{fleet.base_url}/admin")
        await page.goto(f"{fleet.base_url}/admin/console/sandboxes")
        cell = page.locator('tr.sandbox[data-user="mem-user"] td.memory')
        shown = int(await cell.get_attribute("data-bytes"))
        await expect(cell).to_have_text(re.compile(r"^\d+\.\d MiB$"))
        print(f"sandbox {sandbox_id}: PSS {shown / 2**20:.1f} MiB, RSS {rss / 2**20:.1f} MiB")
        assert 4 * 2**20 < shown <= rss * 1.2, (shown, rss)
        # Kept a few seconds: a second view within them does not rescan (PSS moves between two scans).
        await page.reload()
        assert int(await cell.get_attribute("data-bytes")) == shown
    finally:
        await context.close()
    # The CLI measures the same way (its own scan).
    listed = subprocess.run([*MCPFLEET, "sandboxes", "list", "--json"], env=fleet.env, capture_output=True, text=True, timeout=120)
    row = next(r for r in json.loads(listed.stdout) if r["id"] == sandbox_id)
    assert 0.5 * shown < row["memory_bytes"] < 2 * shown, (row["memory_bytes"], shown)
    table = subprocess.run([*MCPFLEET, "sandboxes", "list"], env=fleet.env, capture_output=True, text=True, timeout=120).stdout
    assert "MEMORY (PSS)" in table and re.search(rf"{sandbox_id}.*\d+ MiB", table), table
    # Another backend's sandbox (the shots tenant's docker row) has no figure here.
    async with shooting(shot_browser, fleet, shots, SIZES[0]) as page:
        await page.goto(f"{fleet.base_url}/admin/console/sandboxes")
        await expect(page.locator('tr.sandbox[data-user="ana"] td.memory')).to_have_text("n/a")


def test_no_reference_is_left_without_its_view():
    """Every reference image belongs to a view and size the test takes (a renamed view leaves none behind)."""
    wanted = {f"{slug(view, size)}.png" for size in SIZES for view in VIEWS}
    present = {p.name for p in (Path(__file__).resolve().parent / "screenshots").glob("*.png")}
    assert present == wanted, (present - wanted, wanted - present)
