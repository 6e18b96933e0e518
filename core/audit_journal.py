"""A gateway process's audit entries on local disk before its answers go out, so a process killed
outright (SIGKILL, the OOM killer) loses none of them.

Each process appends its entries, one JSON line each, to a journal file of its own under
`<fleet home>/audit-journal/`, named by a random id, and holds an exclusive `flock` on it for as long
as it lives. Lines carry a sequence number that grows by one. A line is `write()`n as the entry is
recorded (in the kernel's page cache from then on: a killed process cannot lose it) and fsynced in
groups (`durable`): one `fdatasync` covers every line written before it started, so many concurrent
calls share one, and a tool call's answer waits for the one that covers its entry (a machine that
loses power loses no answered call either).

PostgreSQL learns what of a journal is in the chain from `audit_journals` (migrations/0019): the
highest sequence number written, moved in the same transaction as the entries (`written_upto`,
`mark_written`). The row is locked for that transaction, so two writers of one journal take turns,
and each skips what the other wrote: an entry goes into the chain once, whoever writes it, even when
a lost COMMIT is tried again.

A journal whose lock can be taken belongs to no living process (the kernel drops a dead process's
locks): `replay_orphans` takes the lock, appends the entries after the mark up to the last whole line
(a line torn by the death is not an entry), deletes the file while still holding the lock, and
lets go. A second replayer that opened the file before it was deleted finds it deleted once it gets
the lock and leaves it. A live process retires its file for a new one past `ROTATE_BYTES`, and deletes
the old one once everything in it is written.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

ROTATE_BYTES = 32 * 1024 * 1024
REPLAY_BATCH = 500
SUFFIX = ".jsonl"

Row = tuple[str | None, str | None, str, str | None, str, dict[str, Any]]
"""(tenant, actor, action, target, outcome, detail), as `core.audit.append_many` takes them."""


@dataclass(frozen=True, slots=True)
class Journaled:
    """An entry read back from a journal."""

    seq: int
    row: Row


@dataclass
class _File:
    id: str
    path: Path
    fd: int
    last_seq: int = 0


class Journal:
    """This process's journal. Not thread-safe: used from the event loop only."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._current: _File | None = None
        self._retired: list[_File] = []
        self._seq = 0
        self._size = 0
        self._synced = 0
        self._syncing: asyncio.Future[None] | None = None
        self.failed = False
        """Set once a write failed: entries then live in memory only, as before there was a journal."""

    @property
    def ids(self) -> set[str]:
        """The ids of this process's journal files (never replayed as orphans while it lives)."""
        return {f.id for f in (self._current, *self._retired) if f is not None}

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._current = self._new_file()

    def _new_file(self) -> _File:
        id = uuid.uuid4().hex
        path = self.directory / f"{id}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
        self._size = 0
        return _File(id, path, fd)

    def append(self, row: Row) -> tuple[str, int] | None:
        """Writes the entry; returns (journal id, sequence number), or None if it could not be written."""
        if self._current is None or self.failed:
            return None
        if self._size > ROTATE_BYTES:
            self._retired.append(self._current)
            self._current = self._new_file()
        tenant, actor, action, target, outcome, detail = row
        self._seq += 1
        line = json.dumps({"seq": self._seq, "tenant": tenant, "actor": actor, "action": action, "target": target,
                           "outcome": outcome, "detail": detail}, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode() + b"\n"
        try:
            os.write(self._current.fd, line)  # O_APPEND and one write: the line lands whole or torn at the end
        except OSError as exc:
            self.failed = True
            log.error("the audit journal %s cannot be written (%s): audit entries are kept in memory only from now on",
                      self._current.path, exc)
            return None
        self._size += len(line)
        self._current.last_seq = self._seq
        return self._current.id, self._seq

    async def durable(self) -> None:
        """Returns once every line appended so far is on disk; never raises (a failure is logged)."""
        target = self._seq
        while self._synced < target and self._current is not None and not self.failed:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync())
            try:
                await asyncio.shield(self._syncing)
            except Exception as exc:
                log.error("the audit journal could not be synced to disk: %s", exc)
                return

    async def _sync(self) -> None:
        upto = self._seq
        files = [f.fd for f in (*self._retired, self._current) if f is not None]
        try:
            for fd in files:
                await asyncio.to_thread(os.fdatasync, fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def written(self, pending: Iterable[str | None]) -> None:
        """Deletes retired files none of whose entries are still `pending` (the journal ids of the
        entries not yet in the chain)."""
        if not self._retired:
            return
        waiting = set(pending)
        for file in [f for f in self._retired if f.id not in waiting]:
            self._retired.remove(file)
            _delete(file.path, file.fd)

    def close(self, *, all_written: bool) -> None:
        """Lets go of the files; deletes them if everything in them is in the chain, else leaves them
        to be replayed by the next process."""
        for file in (*self._retired, self._current):
            if file is None:
                continue
            if all_written:
                _delete(file.path, file.fd)
            else:
                os.close(file.fd)
        self._current, self._retired = None, []


def _delete(path: Path, fd: int) -> None:
    """Unlinks while the lock is held, then lets go: whoever waits for the lock finds it gone."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def read(fd: int) -> list[Journaled]:
    """The entries of a journal up to its last whole line; a torn or unreadable tail is left out."""
    data = b""
    while chunk := os.pread(fd, 1 << 20, len(data)):
        data += chunk
    entries: list[Journaled] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], 1):  # the last piece has no newline: torn, or empty
        try:
            e = json.loads(line)
            entries.append(Journaled(int(e["seq"]), (e["tenant"], e["actor"], e["action"], e["target"], e["outcome"],
                                                     e["detail"])))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("audit journal line %d unreadable (%s): replaying the %d entries before it", number, exc, len(entries))
            break
    if lines[-1]:
        log.warning("audit journal ends in a torn line of %d bytes (its writer died mid-write): left out", len(lines[-1]))
    return entries


# -- what of a journal is in the chain (audit_journals) ------------------------------------------

async def written_upto(conn: psycopg.AsyncConnection, journals: Iterable[str]) -> dict[str, int]:
    """Each journal's mark, locked until the caller's transaction ends (0 for one never written)."""
    ids = sorted(set(journals))  # one order for every writer: two batches never wait on each other crosswise
    if not ids:
        return {}
    rows = await (await conn.execute(
        "SELECT journal, written_seq FROM audit_journals WHERE journal = ANY(%s) ORDER BY journal FOR UPDATE", (ids,)
    )).fetchall()
    marks = {id: 0 for id in ids}
    marks.update({journal: seq for journal, seq in rows})
    return marks


async def mark_written(conn: psycopg.AsyncConnection, marks: dict[str, int]) -> None:
    for journal, seq in sorted(marks.items()):
        await conn.execute(
            """INSERT INTO audit_journals (journal, written_seq) VALUES (%s, %s)
               ON CONFLICT (journal) DO UPDATE SET written_seq = GREATEST(audit_journals.written_seq, EXCLUDED.written_seq),
                                                    updated_at = now()""",
            (journal, seq),
        )


Append = Callable[[psycopg.AsyncConnection, list[Row]], Awaitable[None]]


async def replay_orphans(pool: AsyncConnectionPool, directory: Path, own: set[str], append: Append) -> int:
    """Appends what journals of dead processes hold and the chain does not; returns how many entries.
    `append` writes rows in the caller's transaction (the call log's, which sets aside what the
    database refuses)."""
    if not directory.is_dir():
        return 0
    replayed = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        id = path.name.removesuffix(SUFFIX)
        if id in own or len(id) != 32:
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # replayed and deleted meanwhile
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process lives, or another replays it now
                os.close(fd)
                continue
            if os.fstat(fd).st_nlink == 0:  # another replayed and deleted it while this one waited
                os.close(fd)
                continue
            replayed += await _replay(pool, id, read(fd), append)
        except BaseException:
            os.close(fd)
            raise
        _delete(path, fd)
        log.info("replayed the audit journal %s of a process that ended without writing it out", id)
    return replayed


async def _replay(pool: AsyncConnectionPool, id: str, entries: list[Journaled], append: Append) -> int:
    done = 0
    for start in range(0, len(entries), REPLAY_BATCH):
        batch = entries[start:start + REPLAY_BATCH]
        async with pool.connection() as conn, conn.transaction():
            mark = (await written_upto(conn, [id]))[id]
            rows = [e.row for e in batch if e.seq > mark]
            if rows:
                await append(conn, rows)
                await mark_written(conn, {id: batch[-1].seq})
            done += len(rows)
    return done
