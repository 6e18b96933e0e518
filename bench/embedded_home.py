"""Where the runsc benches run: a temporary home under /tmp (short: the channel's socket path must
stay within 107 bytes) with an embedded PostgreSQL of its own, removed at exit."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.db import migrate, start_embedded


def run_in_home(prefix: str, bench: Callable[[Path, str], Awaitable[None]], timeout: float) -> None:
    """`bench(home, database_url)`, given up after `timeout` seconds (a TimeoutError)."""
    if shutil.which("runsc") is None:
        raise SystemExit("runsc is not installed")
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    # Registered before the embedded PostgreSQL registers its own stop: exit handlers run last
    # registered first, so the server is down before its data dir goes.
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    url = start_embedded(home / "pg")
    migrate(url)
    asyncio.run(asyncio.wait_for(bench(home, url), timeout))
