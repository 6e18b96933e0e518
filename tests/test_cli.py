"""The `mcpfleet` command as an operator and a publisher use it, against real gateways: it finds
the gateway from the fleet home or flags, lists keys (never their secrets), expires keys, removes
users, rejects and withdraws versions, labels every table, and starts a fleet in a few lines."""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import time

import httpx
import psycopg
import pytest

from cli.main import parser
from tests.clients import connect
from tests.conftest import MCPFLEET, Fleet, make_fleet
from tests.test_registry import project

needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


def run(fleet: Fleet, *args: str, drop: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess[str]:
    """`mcpfleet ARGS` with the fleet's environment, less the variables in `drop`, plus `env`."""
    environ = {k: v for k, v in {**fleet.env, **env}.items() if k not in drop}
    return subprocess.run([*MCPFLEET, *args], env=environ, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def admin(fleet) -> str:
    return fleet.add_user(f"admin-{secrets.token_hex(3)}", role="admin")


def ping(fleet: Fleet, key: str) -> int:
    return httpx.get(f"{fleet.base_url}/registry/v1/whoami", headers={"Authorization": f"Bearer {key}"}).status_code


# -- the command itself -------------------------------------------------------------------------


def test_version_and_help_on_every_argument_and_command(fleet):
    done = run(fleet, "--version")
    assert done.returncode == 0 and done.stdout.startswith("mcpfleet ") and done.stdout.split()[1][0].isdigit()

    missing = []

    def walk(node: argparse.ArgumentParser, path: str) -> None:
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                for name, child in action.choices.items():
                    if name not in helped:
                        missing.append(f"{path} {name}")
                    walk(child, f"{path} {name}")
            elif not action.help and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                missing.append(f"{path} {action.dest}")

    walk(parser(), "mcpfleet")
    assert missing == []


# -- finding the gateway -------------------------------------------------------------------------


def test_commands_find_the_gateway_from_the_fleet_home_or_flags(fleet, admin):
    # MCPFLEET_URL unset: the fleet home's gateway (the port it serves on, from the settings here).
    listed = run(fleet, "registry", "list", "--json", drop=("MCPFLEET_URL",), MCPFLEET_KEY=admin)
    assert listed.returncode == 0, listed.stderr
    assert "io.mcpfleet/workspace" in [s["name"] for s in json.loads(listed.stdout)]

    # Flags beat the environment.
    flagged = run(fleet, "registry", "list", "--url", fleet.base_url, "--key", admin, MCPFLEET_URL="http://127.0.0.1:9",
                  MCPFLEET_KEY="mcpf_wrong")
    assert flagged.returncode == 0, flagged.stderr
    assert flagged.stdout.splitlines()[0].split() == ["SERVER", "PREFIX", "VERSION", "STATUS", "APPROVED", "FOR"]

    # A missing or wrong key is said in terms of what to set.
    nokey = run(fleet, "registry", "list", drop=("MCPFLEET_URL", "MCPFLEET_KEY"))
    assert nokey.returncode == 2 and "no API key was given" in nokey.stderr and "MCPFLEET_KEY" in nokey.stderr
    wrong = run(fleet, "tools", "search", "files", "--key", "mcpf_000000000000_" + "x" * 43)
    assert wrong.returncode == 2 and "refused the API key" in wrong.stderr and "--key" in wrong.stderr


# -- keys -----------------------------------------------------------------------------------------


def test_keys_list_shows_prefixes_and_dates_never_secrets(fleet, admin):
    name = f"lister-{secrets.token_hex(3)}"
    first = fleet.add_user(name)
    second = fleet.cli("keys", "create", name, "--expires", "30d").stdout.strip().splitlines()[-1]
    assert ping(fleet, first) == 200  # noted as used

    table = fleet.cli("keys", "list", "--user", name).stdout
    assert table.splitlines()[0].split() == ["PREFIX", "TENANT", "USER", "CREATED", "EXPIRES", "LAST", "USED"]
    for key in (first, second):
        prefix, secret = key.removeprefix("mcpf_").split("_", 1)
        assert prefix in table and secret not in table
    rows = {r["prefix"]: r for r in json.loads(fleet.cli("keys", "list", "--user", name, "--json").stdout)}
    first_row, second_row = rows[first.split("_")[1]], rows[second.split("_")[1]]
    assert first_row["expires"] is None and first_row["last_used"] is not None
    assert second_row["expires"] is not None and second_row["last_used"] is None
    assert secrets_absent(json.dumps(rows), first, second)
    # Every tenant's keys by default: this user's among them.
    assert first_row["prefix"] in fleet.cli("keys", "list").stdout

    # The prefix from the list is enough to revoke; revoked keys leave the list (and show with --all).
    fleet.cli("keys", "revoke", first_row["prefix"])
    assert first_row["prefix"] not in fleet.cli("keys", "list", "--user", name).stdout
    every = {r["prefix"]: r["state"] for r in json.loads(fleet.cli("keys", "list", "--user", name, "--all", "--json").stdout)}
    assert every[first_row["prefix"]] == "revoked" and every[second_row["prefix"]] == "active"


def secrets_absent(text: str, *keys: str) -> bool:
    return all(key.split("_", 2)[2] not in text for key in keys)


def test_an_expired_key_is_refused_at_auth(fleet):
    name = f"expiring-{secrets.token_hex(3)}"
    fleet.cli("users", "add", name)
    key = fleet.cli("keys", "create", name, "--expires", "12h").stdout.strip().splitlines()[-1]
    prefix = key.split("_")[1]
    # Moving the key's expiry into the past stands in for twelve hours going by. Before its first
    # use, so that no gateway holds it verified.
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE prefix = %s", (prefix,))
    assert ping(fleet, key) == 401
    assert prefix not in fleet.cli("keys", "list", "--user", name).stdout
    states = {r["prefix"]: r["state"] for r in json.loads(fleet.cli("keys", "list", "--user", name, "--all", "--json").stdout)}
    assert states[prefix] == "expired"

    # A key that expires while a gateway trusts it from its cache (30 s) is refused from its expiry on.
    soon = fleet.cli("keys", "create", name, "--expires", "1h").stdout.strip().splitlines()[-1]
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:  # an hour, shortened to 3 s
        conn.execute("UPDATE api_keys SET expires_at = now() + interval '3 seconds' WHERE prefix = %s", (soon.split("_")[1],))
    assert ping(fleet, soon) == 200
    time.sleep(3.5)
    assert ping(fleet, soon) == 401

    bad = run(fleet, "keys", "create", name, "--expires", "30x")
    assert bad.returncode == 2 and "not a duration like 30d" in bad.stderr


# -- users ----------------------------------------------------------------------------------------


@needs_runsc
async def test_removing_a_user_revokes_their_keys_and_reclaims_their_sandbox(fleet):
    name = f"leaver-{secrets.token_hex(3)}"
    key = fleet.add_user(name)
    async with connect(fleet.mcp_url, key) as client:
        assert not (await client.call_tool("workspace__write_file", {"path": "a.txt", "content": "bye"})).is_error
    live = [s for s in json.loads(fleet.cli("sandboxes", "list", "--json").stdout) if s["user"] == name]
    assert len(live) == 1

    done = fleet.cli("users", "remove", name)
    assert f"removed default/{name}: 1 key revoked, its sandbox reclaimed" in done.stdout
    assert ping(fleet, key) == 401
    assert name not in [u["user"] for u in json.loads(fleet.cli("users", "list", "--json").stdout)]
    assert not [s for s in json.loads(fleet.cli("sandboxes", "list", "--json").stdout) if s["user"] == name]
    again = run(fleet, "users", "remove", name)
    assert again.returncode == 1 and "no user" in again.stderr


# -- tables ---------------------------------------------------------------------------------------


def test_every_listing_has_a_header_and_json(fleet, admin):
    listings = [("users", "list"), ("keys", "list"), ("tenants", "list"), ("tiers", "list"), ("sandboxes", "list"),
                ("issuers", "list"), ("registry", "list"), ("registry", "usage"), ("tools", "search", "read a file")]
    for command in listings:
        table = run(fleet, *command, MCPFLEET_KEY=admin)
        assert table.returncode == 0, (command, table.stderr)
        header = table.stdout.splitlines()[0]
        assert header == header.upper() and header.split(), (command, header)
        as_json = run(fleet, *command, "--json", MCPFLEET_KEY=admin)
        assert isinstance(json.loads(as_json.stdout), list), command
    drift = run(fleet, "registry", "drift", "--json", MCPFLEET_KEY=admin)
    assert json.loads(drift.stdout) == []


# -- rejecting and withdrawing versions -------------------------------------------------------------


TOOL = '''
@server.tool()
def shout(text: str) -> str:
    """Say it louder"""
    return text.upper()
'''


@needs_runsc
def test_a_pending_version_can_be_rejected_or_withdrawn_but_not_then_approved(fleet, admin, tmp_path):
    tenant = "default"
    publisher = fleet.add_user(f"pub-{secrets.token_hex(3)}", tenant=tenant, role="publisher")
    other = fleet.add_user(f"pub-{secrets.token_hex(3)}", tenant=tenant, role="publisher")
    name = f"io.example/shout{secrets.token_hex(2)}"
    for version in ("1.0.0", "1.1.0"):
        done = run(fleet, "publish", str(project(tmp_path, name, version, TOOL)), "--no-wait", MCPFLEET_KEY=publisher)
        assert done.returncode == 0, done.stdout + done.stderr

    # Withdrawn while it is still validating: the verdict that comes later does not undo it.
    refused = run(fleet, "registry", "withdraw", name, "1.0.0", MCPFLEET_KEY=other)
    assert refused.returncode == 2 and "403" in refused.stderr and "only they or an admin" in refused.stderr
    withdrawn = run(fleet, "registry", "withdraw", name, "1.0.0", "--reason", "typo", MCPFLEET_KEY=publisher)
    assert withdrawn.returncode == 0, withdrawn.stderr
    member_try = run(fleet, "registry", "reject", name, "1.1.0", MCPFLEET_KEY=publisher)
    assert member_try.returncode == 2 and "403" in member_try.stderr
    rejected = run(fleet, "registry", "reject", name, "1.1.0", "--reason", "not needed here", MCPFLEET_KEY=admin)
    assert rejected.returncode == 0, rejected.stderr

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        shown = json.loads(run(fleet, "registry", "show", name, "1.0.0", "--json", MCPFLEET_KEY=admin).stdout)
        if shown["validated_at"] is not None:
            break
        time.sleep(2)
    assert shown["status"] == "withdrawn" and shown["decided_by"].startswith("pub-") and shown["validation"]
    text = run(fleet, "registry", "show", name, "1.1.0", MCPFLEET_KEY=admin).stdout
    assert "rejected by admin-" in text and "not needed here" in text

    for version, status in (("1.0.0", "withdrawn"), ("1.1.0", "rejected")):
        approve = run(fleet, "registry", "approve", name, version, "--override", MCPFLEET_KEY=admin)
        assert approve.returncode == 2 and f"was {status}" in approve.stderr
        again = run(fleet, "registry", "reject", name, version, MCPFLEET_KEY=admin)
        assert again.returncode == 2 and f"already {status}" in again.stderr
    with psycopg.connect(fleet.database_url) as conn:
        actions = [a for (a,) in conn.execute(
            "SELECT action FROM audit_entries WHERE target LIKE %s ORDER BY id", (f"{name}@%",))]
    assert "registry.withdraw" in actions and "registry.reject" in actions


# -- starting a fleet -----------------------------------------------------------------------------


def test_a_first_start_is_quiet_and_records_where_it_serves(tmp_path_factory, postgres_url):
    fresh = make_fleet(tmp_path_factory, postgres_url)
    # An empty database, as on a fleet's first start: every migration is applied by `mcpfleet up`.
    name = f"empty_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    fresh.env["DATABASE_URL"] = fresh.database_url = postgres_url.replace("/postgres?", f"/{name}?")
    fresh.start()
    try:
        log = fresh.log()
        assert "yoyo" not in log and "applying step" not in log
        [summary] = [line for line in log.splitlines() if "database schema" in line]
        assert "applied" in summary and "0001_initial" in summary
        record = json.loads((fresh.home / "gateway.json").read_text())
        assert record["url"] == fresh.base_url

        # Nothing but the fleet home says where it is: no MCPFLEET_URL, no MCPFLEET_PORT.
        key = fresh.add_user("operator", role="admin")
        env = {k: v for k, v in fresh.env.items() if k not in ("MCPFLEET_URL", "MCPFLEET_PORT")}
        done = subprocess.run([*MCPFLEET, "registry", "list"], env={**env, "MCPFLEET_KEY": key},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        fresh.stop()
    assert not (fresh.home / "gateway.json").exists()
