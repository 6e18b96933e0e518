"""The advisory model review at validation (registry/review.py), against the real local model.

The model is Gemma 3 270M, a tiny base model whose verdicts are arbitrary: these tests assert the
review's structure (one verdict per tool, charged to the publisher as purpose `review`), never what it
says. Publishing goes through the real fleet: build, upload, a trial run in runsc, the scan, the review.
"""

from __future__ import annotations

import json
import shutil
import time

import psycopg
import pytest
from playwright.async_api import expect

from tests.browser import browser, context  # noqa: F401  (fixtures)
from tests.conftest import Fleet, make_fleet
from tests.test_admin_page import admin_page, pending
from tests.test_registry import WEATHER, cli

pytestmark = [pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"), pytest.mark.timeout(900)]


MARKUP = "asks to <b>read</b> files <img src=x id=injected onerror=alert(1)>"


def publish_and_show(fleet: Fleet, publisher: str, admin: str) -> dict:
    started = time.perf_counter()
    published = cli(fleet, publisher, "publish", str(WEATHER))
    print(f"\npublish with validation {time.perf_counter() - started:.1f} s")
    assert "passed" in published.stdout, published.stdout
    return json.loads(cli(fleet, admin, "registry", "show", "io.example/weather", "1.0.0", "--json").stdout)


def model_asks(fleet: Fleet) -> list[tuple[str, dict]]:
    with psycopg.connect(fleet.database_url) as conn:
        return list(conn.execute("SELECT outcome, detail FROM audit_entries WHERE action = 'model.ask' ORDER BY id"))


def started_fleet(tmp_path_factory, postgres_url, **env: str) -> Fleet:
    running = make_fleet(tmp_path_factory, postgres_url, **env)
    running.start()
    running.keys = {role: running.add_user(f"{role}-1", role=role) for role in ("admin", "publisher")}
    return running


async def test_review_on_gives_each_tool_a_verdict_charged_to_the_publisher(tmp_path_factory, postgres_url, context):
    fleet = started_fleet(tmp_path_factory, postgres_url, MCPFLEET_LOCAL_MODEL="auto", MCPFLEET_MODEL_REVIEW="on")
    try:
        deadline = time.monotonic() + 180
        while "local model gemma-3-270m ready" not in fleet.log():
            assert time.monotonic() < deadline, fleet.log()[-2000:]
            time.sleep(0.5)
        version = publish_and_show(fleet, fleet.keys["publisher"], fleet.keys["admin"])
        [review] = [c for c in version["validation"] if c["check"] == "model review"]
        print("model review:", json.dumps(review))
        assert review["ok"] is True and review["advisory"] is True, review
        assert not review["detail"].startswith("review not done"), review
        assert sorted(r["tool"] for r in review["reviews"]) == ["alerts", "forecast"]
        for r in review["reviews"]:
            assert r["verdict"] in ("ok", "suspicious") and isinstance(r["reasons"], list) and len(r["reasons"]) <= 2
            assert all(isinstance(reason, str) for reason in r["reasons"])
        # Every suspicious verdict is a finding (what the admin page and the CLI list); it never fails validation.
        assert sorted(f["tool"] for f in review["findings"]) == sorted(r["tool"] for r in review["reviews"] if r["verdict"] == "suspicious")
        assert version["status"] == "passed"
        shown = cli(fleet, fleet.keys["admin"], "registry", "show", "io.example/weather", "1.0.0").stdout
        assert "model review: 2 tool(s) reviewed" in shown, shown

        with psycopg.connect(fleet.database_url) as conn:
            rows = list(conn.execute(
                "SELECT u.name, m.purpose, m.asks, m.tokens_out FROM model_usage m JOIN users u ON u.id = m.user_id"))
        assert [(name, purpose, asks) for name, purpose, asks, _ in rows] == [("publisher-1", "review", 2)]
        assert rows[0][3] > 0
        assert [(outcome, d["purpose"]) for outcome, d in model_asks(fleet)] == [("ok", "review"), ("ok", "review")]

        # How a flagged tool is shown. The tiny model's verdicts are arbitrary, so a suspicious one is
        # written here as the review writes it, its reason carrying markup (a model's words are untrusted).
        flagged = {**review, "reviews": [{"tool": "forecast", "verdict": "suspicious", "reasons": [MARKUP]}],
                   "findings": [{"check": "model review", "tool": "forecast", "path": "", "message": "suspicious: " + MARKUP}]}
        with psycopg.connect(fleet.database_url) as conn:
            conn.execute("UPDATE registry_versions SET validation = %s::jsonb WHERE version = '1.0.0'",
                         (json.dumps([c if c["check"] != "model review" else flagged for c in version["validation"]]),))
        shown = cli(fleet, fleet.keys["admin"], "registry", "show", "io.example/weather", "1.0.0").stdout
        assert "NOTE model review" in shown and "forecast" in shown, shown
        page = await admin_page(context, fleet, fleet.keys["admin"])
        card = pending(page, "1.0.0")
        check = card.locator('li.check.advisory[data-check="model review"]')
        await expect(check.locator(".mark")).to_have_text("!")
        await expect(check.locator(".findings li")).to_contain_text("suspicious: " + MARKUP)
        await expect(card.locator("li.check.failed")).to_have_count(0)
        await expect(page.locator("#injected")).to_have_count(0)
    finally:
        fleet.stop()


def test_review_with_the_model_not_ready_is_recorded_as_not_done_and_validation_completes(tmp_path_factory, postgres_url):
    # The state of a fresh `make run` while scripts/models.sh still builds llama-server: no model file yet.
    empty = tmp_path_factory.mktemp("no-model")
    fleet = started_fleet(tmp_path_factory, postgres_url, MCPFLEET_LOCAL_MODEL="on", MCPFLEET_MODELS_DIR=str(empty),
                          MCPFLEET_MODEL_REVIEW="on")
    try:
        version = publish_and_show(fleet, fleet.keys["publisher"], fleet.keys["admin"])
        [review] = [c for c in version["validation"] if c["check"] == "model review"]
        assert review["ok"] is True and review["reviews"] == [] and review["findings"] == []
        assert review["detail"].startswith("review not done: not_ready"), review
        assert version["status"] == "passed"
        assert [(outcome, d["purpose"], d["reason"]) for outcome, d in model_asks(fleet)] == [("refused", "review", "not_ready")]
    finally:
        fleet.stop()


def test_review_off_asks_no_model_and_adds_no_check(tmp_path_factory, postgres_url):
    # The local model is ready here, so only the setting (off by default) keeps the review from asking it.
    fleet = started_fleet(tmp_path_factory, postgres_url, MCPFLEET_LOCAL_MODEL="auto")
    try:
        version = publish_and_show(fleet, fleet.keys["publisher"], fleet.keys["admin"])
        assert "model review" not in {c["check"] for c in version["validation"]}
        assert model_asks(fleet) == []
    finally:
        fleet.stop()
