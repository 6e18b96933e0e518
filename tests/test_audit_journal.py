"""The audit journal (core/audit_journal.py): a gateway killed with SIGKILL right after answering loses
no audit entry, a torn journal is replayed up to its last whole line, and two processes replaying one
journal write each entry once. Real processes, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg

from bench.load_traffic import call
from core import audit, audit_journal
from core.db import open_pool
from gateway.call_audit import CallAudit, append_rows, arguments_hash
from tests.conftest import ROOT, fresh_database, make_fleet


def tagged(url: str, tag: str) -> list[tuple[str, dict]]:
    """(action, detail) of the entries whose detail carries `tag`, in chain order."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT action, detail FROM audit_entries WHERE detail->>'tag' = %s ORDER BY id", (tag,)).fetchall()
    return [(action, detail) for action, detail in rows]


async def verified(url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await audit.verify(conn) is None


def orphan(directory: Path, tag: str, count: int) -> Path:
    """A journal left by a process that ended without writing it out: its lock let go, its file kept."""
    journal = audit_journal.Journal(directory)
    journal.open()
    for n in range(count):
        assert journal.append((None, "test/orphan", "test.entry", f"t{n}", "ok", {"tag": tag, "n": n})) is not None
    [id] = journal.ids
    journal.close(all_written=False)
    return directory / f"{id}{audit_journal.SUFFIX}"


async def test_a_gateway_killed_right_after_answering_loses_no_audit_entry(tmp_path_factory, postgres_url):
    fleet = make_fleet(tmp_path_factory, postgres_url)
    fleet.start()
    try:
        key = fleet.add_user("kate")
        answered: list[str] = []
        # Stateless 2026-07-28 calls over plain HTTP (bench/load_traffic.py), many at once: group fsyncs.
        async with httpx.AsyncClient() as client:
            async def write(n: int) -> None:
                arguments = {"path": f"k{n}.txt", "content": f"call {n}"}
                ok, error, _ = await call(client, fleet.mcp_url, key, "workspace__write_file", arguments)
                assert ok, error
                answered.append(arguments_hash(arguments))
            await write(0)  # the sandbox up, so the calls below are quick
            await asyncio.gather(*(write(n) for n in range(1, 13)))  # within the 16 calls a user may have in flight
        # Killed within a millisecond or so of the last answer: the batch writer (once a second) has not
        # written these calls yet, so only the journal has them.
        fleet.process.send_signal(signal.SIGKILL)
        fleet.process.wait(timeout=30)
        fleet.process = None
        journal_dir = fleet.home / "audit-journal"
        assert any(journal_dir.glob("*.jsonl")), "the killed gateway left no journal"

        fleet.start()  # the next process replays what the dead one journaled
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            with psycopg.connect(fleet.database_url) as conn:
                hashes = [r[0] for r in conn.execute(
                    "SELECT detail->>'args_sha256' FROM audit_entries WHERE action = 'tool.call' AND actor = 'default/kate' "
                    "AND outcome = 'ok'").fetchall()]
            if set(answered) <= set(hashes) or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        assert sorted(hashes) == sorted(answered)  # every answered call, once
        assert len(list(journal_dir.glob("*.jsonl"))) == 1, "the replayed journal was not deleted (only the new process's is left)"
        assert fleet.cli("audit", "verify").returncode == 0
        assert "replayed the audit journal" in fleet.log()
    finally:
        fleet.stop()


async def test_a_torn_journal_is_replayed_up_to_its_last_whole_entry(tmp_path, postgres_url):
    url = fresh_database(postgres_url)
    path = orphan(tmp_path, "torn", 5)
    with open(path, "ab") as f:  # the dead process's last write, cut short
        f.write(b'{"seq":6,"tenant":null,"actor":"test/orphan","action":"test.en')
    pool = await open_pool(url)
    try:
        assert await audit_journal.replay_orphans(pool, tmp_path, set(), append_rows) == 5
        assert await audit_journal.replay_orphans(pool, tmp_path, set(), append_rows) == 0
    finally:
        await pool.close()
    assert [d["n"] for _, d in tagged(url, "torn")] == [0, 1, 2, 3, 4]
    assert not path.exists()
    assert await verified(url)


async def test_the_mark_keeps_a_journal_found_again_from_being_written_twice(tmp_path, postgres_url):
    """The lock guards one machine's processes; the database's mark guards the rest (a journal restored
    from a backup, a home on a file system without locks)."""
    url = fresh_database(postgres_url)
    path = orphan(tmp_path, "again", 3)
    kept = path.read_bytes()
    pool = await open_pool(url)
    try:
        assert await audit_journal.replay_orphans(pool, tmp_path, set(), append_rows) == 3
        path.write_bytes(kept + b'{"seq":4,"tenant":null,"actor":"test/orphan","action":"test.entry","target":"t3",'
                                b'"outcome":"ok","detail":{"tag":"again","n":3}}\n')
        assert await audit_journal.replay_orphans(pool, tmp_path, set(), append_rows) == 1
    finally:
        await pool.close()
    assert [d["n"] for _, d in tagged(url, "again")] == [0, 1, 2, 3]


REPLAYER = """
import asyncio, sys, time
from pathlib import Path
from core.db import open_pool
from gateway.call_audit import CallAudit

async def main(url, directory, go, orphan):
    pool = await open_pool(url)
    calls = CallAudit(journal_dir=Path(directory))
    while not Path(go).exists():
        time.sleep(0.001)
    calls.start(pool)  # replays at once what dead processes left, as a gateway does on start
    while Path(orphan).exists():
        await asyncio.sleep(0.05)
    await calls.close()
    await pool.close()
    print(calls.replayed)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_replaying_one_orphan_journal_write_each_entry_once(tmp_path, postgres_url):
    url = fresh_database(postgres_url)
    directory = tmp_path / "journal"
    path = orphan(directory, "twice", 2000)  # several replay batches, so the two overlap in time
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    replayers = [subprocess.Popen([sys.executable, "-c", REPLAYER, url, str(directory), str(go), str(path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    counts = []
    for replayer in replayers:
        out, err = await asyncio.to_thread(replayer.communicate, timeout=180)
        assert replayer.returncode == 0, err
        counts.append(int(out.strip().splitlines()[-1]))
    assert sum(counts) == 2000
    assert [d["n"] for _, d in tagged(url, "twice")] == list(range(2000))
    assert not list(directory.glob("*.jsonl"))  # each process deleted its own (empty) journal on close
    assert await verified(url)


async def test_an_entry_is_in_the_journal_before_the_database_has_it(tmp_path, postgres_url):
    """What `durable` promises: the line is on disk, the database not yet written (the writer's round is
    a second away)."""
    url = fresh_database(postgres_url)
    pool = await open_pool(url)
    calls = CallAudit(journal_dir=tmp_path)
    calls.start(pool)
    try:
        calls.record("test.entry", "ok", detail={"tag": "durable"})
        await calls.durable()
        [path] = tmp_path.glob("*.jsonl")
        [line] = path.read_text().splitlines()
        assert json.loads(line)["detail"] == {"tag": "durable"}
        assert tagged(url, "durable") == []
    finally:
        await calls.close()
        await pool.close()
    assert [a for a, _ in tagged(url, "durable")] == ["test.entry"]
    assert not list(tmp_path.glob("*.jsonl"))
