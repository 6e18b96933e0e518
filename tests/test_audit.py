"""The audit log: one hash chain however it is appended to, refused changes, and tampering by
someone with superuser rights found at the first entry it touched, by the API and by the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise

import psycopg
import pytest

from core import accounts, audit
from tests.conftest import ROOT, fresh_database


@pytest.fixture
def url(postgres_url: str) -> str:
    return fresh_database(postgres_url, "audit")


@pytest.fixture
async def conn(url: str):
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
        yield c


def mcpfleet(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def append_some(conn: psycopg.AsyncConnection, n: int, tenant: str = "acme") -> None:
    for i in range(n):
        await audit.append(
            conn,
            action="tool.call",
            outcome="ok",
            tenant=tenant,
            actor=f"{tenant}/alice",
            target=f"workspace__read_file#{i}",
            detail={"arguments_sha256": f"{i:064x}", "ms": 1.5 * i},
        )


async def all_entries(conn: psycopg.AsyncConnection, **filters) -> list[audit.Entry]:
    return [e async for e in audit.entries(conn, **filters)]


async def test_appends_form_an_intact_chain(conn):
    ids = [await audit.append(conn, action="user.add", outcome="ok") for _ in range(3)]
    await append_some(conn, 3)
    assert ids == [1, 2, 3]
    assert await audit.verify(conn) is None
    stored = await all_entries(conn)
    assert [e.id for e in stored] == [1, 2, 3, 4, 5, 6]
    assert stored[0].prev_hash == audit.GENESIS
    assert all(later.prev_hash == earlier.hash for earlier, later in pairwise(stored))
    assert all(earlier.at <= later.at for earlier, later in pairwise(stored))
    assert await audit.head(conn) == audit.Head(6, stored[-1].hash)


async def test_id_time_and_hashes_are_the_databases_whatever_the_insert_says(conn):
    await append_some(conn, 2)
    row = await (
        await conn.execute(
            """INSERT INTO audit_entries (id, at, action, outcome, prev_hash, hash)
               VALUES (99, '2000-01-01', 'forged', 'ok', '\\x00', '\\x00') RETURNING id, at"""
        )
    ).fetchone()
    assert row[0] == 3
    assert row[1] > datetime.now(UTC) - timedelta(minutes=5)
    assert await audit.verify(conn) is None


async def test_a_rolled_back_append_leaves_no_gap(conn):
    await append_some(conn, 1)
    with pytest.raises(LookupError):
        async with conn.transaction():
            await audit.append(conn, action="key.create", outcome="ok")
            raise LookupError
    assert await audit.append(conn, action="key.create", outcome="ok") == 2
    assert await audit.verify(conn) is None


async def test_concurrent_appends_from_20_connections_stay_one_chain(url, conn):
    async def writer(n: int) -> int:
        committed = 0
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as c:
            for i in range(25):
                if i % 5 == 4:
                    # Appends inside a caller's transaction, some of them rolled back.
                    try:
                        async with c.transaction():
                            await c.execute("SELECT pg_sleep(0.001)")
                            await audit.append(c, action="tool.call", outcome="ok", actor=f"writer{n}")
                            if i % 10 == 9:
                                raise LookupError
                        committed += 1
                    except LookupError:
                        pass
                else:
                    await audit.append(c, action="tool.call", outcome="ok", actor=f"writer{n}", detail={"i": i})
                    committed += 1
        return committed

    committed = sum(await asyncio.gather(*(writer(n) for n in range(20))))
    assert committed == 20 * 25 - 20 * 2
    assert await audit.verify(conn) is None
    stored = await all_entries(conn)
    assert [e.id for e in stored] == list(range(1, committed + 1))
    assert len({e.actor for e in stored}) == 20
    assert (await audit.head(conn)).last_id == committed


TIMES = [
    datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
    datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=-8))),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))),
]
STRINGS = [None, "", "plain", 'quote " backslash \\ slash /', "\t\n\r\b\f\x01\x1f\x7f", "Zürich ☃ 𝄞 \u2028 <b>&amp;"]
DETAILS = [
    {},
    {"b": 1, "a": 2, "aa": 3, "": "empty key"},
    {"n": [0, -1, 10**30, 1.5, 1.10, 1e16, 1e-7, -0.0, 2.5e-300], "t": True, "f": False, "z": None},
    {"nested": {"ü": ["☃", {"y": 1, "x": [{}]}]}, "ctl": "\x1b[0m"},
]


async def test_canonical_form_is_the_same_in_python_and_postgresql(conn):
    # A session time zone far from UTC, so that the UTC conversion has to happen.
    await conn.execute("SET TIME ZONE 'America/St_Johns'")
    for i, (at, text, detail) in enumerate(zip(TIMES * 2, STRINGS, DETAILS * 2)):
        sql_text, detail_text, at_back = await (
            await conn.execute(
                "SELECT audit_canonical(%s, %s, %s, %s, %s, %s, %s, %s::jsonb), %s::jsonb::text, %s::timestamptz",
                (i, at, text, text, text or "a", text, text or "o", json.dumps(detail), json.dumps(detail), at),
            )
        ).fetchone()
        assert at_back == at
        assert audit.canonical(i, at_back, text, text, text or "a", text, text or "o", detail_text) == sql_text
    assert audit.canonical_time(TIMES[0]) == "2024-02-29T23:59:59.000000Z"
    assert audit.canonical_time(TIMES[1]) == "2024-01-01T08:00:00.000001Z"
    assert audit.canonical_time(TIMES[2]) == "1999-12-31T18:29:59.999999Z"


async def test_canonical_form_survives_the_round_trip_through_postgresql(url, conn):
    await conn.execute("SET TIME ZONE 'Pacific/Chatham'")
    for text, detail in zip(STRINGS, DETAILS * 2):
        await audit.append(
            conn, action=text or "a", outcome=text or "o", tenant=text, actor=text, target=text, detail=detail
        )
    # Key order is jsonb's, not the caller's.
    await audit.append(conn, action="a", outcome="o", detail={"b": 1, "a": {"d": 2, "c": 3}})
    await audit.append(conn, action="a", outcome="o", detail={"a": {"c": 3, "d": 2}, "b": 1})
    texts = [r[0] for r in await (await conn.execute("SELECT detail::text FROM audit_entries ORDER BY id")).fetchall()]
    assert texts[-1] == texts[-2]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
        await other.execute("SET TIME ZONE 'Asia/Kathmandu'")
        assert await audit.verify(other) is None
        for e in await all_entries(other):
            assert json.loads(json.dumps(e.to_json())) == e.to_json()
            assert datetime.fromisoformat(e.to_json()["at"]) == e.at


async def test_plain_changes_are_refused(conn):
    await append_some(conn, 2)
    for statement in [
        "UPDATE audit_entries SET outcome = 'denied' WHERE id = 1",
        "DELETE FROM audit_entries WHERE id = 2",
        "TRUNCATE audit_entries",
        "UPDATE audit_head SET last_id = 1",
        "DELETE FROM audit_head",
        "INSERT INTO audit_head (one, last_id, last_hash) VALUES (false, 0, '\\x00')",
        "TRUNCATE audit_head",
    ]:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="the audit log is append-only"):
            await conn.execute(statement)
    assert await audit.verify(conn) is None
    assert len(await all_entries(conn)) == 2


REHASH = "hash = audit_hash(prev_hash, audit_canonical(id, at, tenant, actor, action, target, outcome, detail))"
TAMPERING = {
    "outcome changed": ("UPDATE audit_entries SET outcome = 'denied' WHERE id = 3", 3, "hash mismatch"),
    "detail changed": ("UPDATE audit_entries SET detail = '{}' WHERE id = 2", 2, "hash mismatch"),
    "time moved by a microsecond": (
        "UPDATE audit_entries SET at = at + interval '1 microsecond' WHERE id = 4",
        4,
        "hash mismatch",
    ),
    "changed and rehashed": (
        f"UPDATE audit_entries SET outcome = 'denied' WHERE id = 3; UPDATE audit_entries SET {REHASH} WHERE id = 3",
        4,
        "link mismatch",
    ),
    "middle entry deleted": ("DELETE FROM audit_entries WHERE id = 3", 3, "gap"),
    "first entry deleted": ("DELETE FROM audit_entries WHERE id = 1", 1, "gap"),
    "last entry deleted": ("DELETE FROM audit_entries WHERE id = 6", 6, "head mismatch"),
    "last two deleted": ("DELETE FROM audit_entries WHERE id >= 5", 5, "head mismatch"),
    "entry appended behind the head's back": (
        f"""INSERT INTO audit_entries (id, tenant, action, outcome, prev_hash, hash)
            SELECT 7, 'acme', 'forged', 'ok', hash, hash FROM audit_entries WHERE id = 6;
            UPDATE audit_entries SET {REHASH} WHERE id = 7""",
        7,
        "head mismatch",
    ),
    "entry slipped in before the first": (
        "INSERT INTO audit_entries (id, action, outcome, prev_hash, hash) VALUES (0, 'forged', 'ok', '\\x00', '\\x00')",
        0,
        "out of place",
    ),
}


@pytest.mark.parametrize("how", ["replica role", "triggers disabled"])
@pytest.mark.parametrize("case", TAMPERING)
async def test_tampering_by_a_superuser_is_found_at_the_first_broken_entry(url, conn, case, how):
    statement, broken_id, reason = TAMPERING[case]
    await append_some(conn, 6)
    with psycopg.connect(url, autocommit=True) as attacker:
        if how == "replica role":
            attacker.execute("SET session_replication_role = replica")
            attacker.execute(statement)
        else:
            attacker.execute("ALTER TABLE audit_entries DISABLE TRIGGER ALL")
            attacker.execute(statement)
            attacker.execute("ALTER TABLE audit_entries ENABLE TRIGGER ALL")

    broken = await audit.verify(conn, batch=2)
    assert broken is not None and broken.id == broken_id and broken.reason.startswith(reason), broken
    if how == "replica role" and case in ("outcome changed", "middle entry deleted", "last entry deleted"):
        done = mcpfleet(url, "audit", "verify")
        assert done.returncode == 1, done
        assert done.stdout.strip() == f"audit log broken at entry {broken_id}: {broken.reason}"


async def test_cli_verify_reports_an_intact_log(url, conn):
    done = mcpfleet(url, "audit", "verify")
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "audit log intact: 0 entries"), done
    await append_some(conn, 4)
    done = mcpfleet(url, "audit", "verify")
    head = await audit.head(conn)
    assert done.returncode == 0, done
    assert done.stdout.splitlines() == ["audit log intact: 4 entries", f"head: entry 4, sha256 {head.last_hash.hex()}"]


async def test_export_round_trips(url, conn):
    await append_some(conn, 3, tenant="acme")
    await append_some(conn, 2, tenant="globex")
    await append_some(conn, 3, tenant="acme")
    everything = await all_entries(conn, batch=3)
    assert [e.id for e in everything] == list(range(1, 9))

    done = mcpfleet(url, "audit", "export", "--json")
    assert done.returncode == 0, done
    exported = [json.loads(line) for line in done.stdout.splitlines()]
    assert exported == [e.to_json() for e in everything]
    assert [e["prev_hash"] for e in exported[1:]] == [e["hash"] for e in exported[:-1]]
    for line, entry in zip(exported, everything):
        assert datetime.fromisoformat(line["at"]) == entry.at
        assert bytes.fromhex(line["hash"]) == entry.hash

    acme = mcpfleet(url, "audit", "export", "--json", "--tenant", "acme")
    assert [json.loads(line)["id"] for line in acme.stdout.splitlines()] == [1, 2, 3, 6, 7, 8]
    since = exported[4]["at"]
    later = mcpfleet(url, "audit", "export", "--json", "--since", since)
    assert [json.loads(line)["id"] for line in later.stdout.splitlines()] == [5, 6, 7, 8]
    both = mcpfleet(url, "audit", "export", "--json", "--tenant", "globex", "--since", since)
    assert [json.loads(line)["id"] for line in both.stdout.splitlines()] == [5]
    naive = mcpfleet(url, "audit", "export", "--since", since.removesuffix("Z"))
    assert [int(line.split("\t")[0]) for line in naive.stdout.splitlines()] == [5, 6, 7, 8]

    assert [e.id for e in await all_entries(conn, tenant="acme", limit=4, batch=3)] == [1, 2, 3, 6]
    assert [e.id for e in await all_entries(conn, since=everything[6].at)] == [7, 8]
    assert await all_entries(conn, limit=0) == []


async def test_account_changes_are_audited_without_secrets(url, conn):
    alice = await accounts.add_user(conn, "alice", tenant="acme", role="admin", actor="acme/root")
    first = await accounts.create_key(conn, alice, actor="acme/root")
    second = await accounts.create_key(conn, alice)
    with pytest.raises(accounts.AccountError):
        await accounts.add_user(conn, "alice", tenant="acme")
    # The whole key is given here; only its prefix may reach the log.
    assert await accounts.revoke_keys(conn, key_or_prefix=first, actor="acme/root") == 1
    assert await accounts.revoke_keys(conn, key_or_prefix=first) == 0
    assert await accounts.revoke_keys(conn, user=alice) == 1

    assert mcpfleet(url, "users", "add", "bob").returncode == 0
    third = mcpfleet(url, "keys", "create", "bob").stdout.strip().splitlines()[-1]
    assert mcpfleet(url, "keys", "revoke", third).returncode == 0

    done = mcpfleet(url, "audit", "export", "--json")
    assert done.returncode == 0, done
    for key in (first, second, third):
        prefix, secret = accounts.split_key(key)
        assert secret not in done.stdout
        assert prefix in done.stdout
    summary = [
        (e["action"], e["tenant"], e["actor"], e["target"], e["outcome"], e["detail"])
        for e in map(json.loads, done.stdout.splitlines())
    ]
    p = [accounts.split_key(k)[0] for k in (first, second, third)]
    assert summary == [
        ("user.add", "acme", "acme/root", "acme/alice", "ok", {"role": "admin"}),
        ("key.create", "acme", "acme/root", "acme/alice", "ok", {"prefix": p[0]}),
        ("key.create", "acme", None, "acme/alice", "ok", {"prefix": p[1]}),
        ("key.revoke", "acme", "acme/root", "acme/alice", "ok", {"prefixes": [p[0]]}),
        ("key.revoke", "acme", None, "acme/alice", "ok", {"prefixes": [p[1]]}),
        ("user.add", "default", None, "default/bob", "ok", {"role": "member"}),
        ("key.create", "default", None, "default/bob", "ok", {"prefix": p[2]}),
        ("key.revoke", "default", None, "default/bob", "ok", {"prefixes": [p[2]]}),
    ]
    assert mcpfleet(url, "audit", "verify").stdout.startswith("audit log intact: 8 entries")


async def test_a_change_that_rolls_back_takes_its_entry_with_it(conn):
    alice = await accounts.add_user(conn, "alice")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await accounts.create_key(conn, alice)
            raise RuntimeError
    assert [e.action for e in await all_entries(conn)] == ["user.add"]
    assert await audit.verify(conn) is None
