"""The fleet that bench/load_faults.py and tests/test_faults_under_load.py put under load and faults:
`mcpfleet up --replicas N` on loopback with an embedded PostgreSQL that can be restarted and a
redis-server that can be stopped, and the checks that nothing was lost (audit entries, files).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import psycopg

from bench.load_traffic import Record, call
from core.db import RestartableEmbedded, start_embedded
from core.openbao import EmbeddedOpenBao
from gateway.call_audit import arguments_hash
from sandbox.lease import APPLICATION

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "cli"]
# High enough never to refuse this load, but not 0: a set limit is counted in Redis, so stopping
# Redis is a fault the calls meet (fail open), not one no call notices.
SETTINGS = {"MCPFLEET_RATE_LIMIT_PER_MIN": "100000000", "MCPFLEET_TOOL_RATE_LIMIT_PER_MIN": "100000000",
            "MCPFLEET_MAX_CONCURRENT_CALLS": "0"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, workdir: Path):
        self.port, self.workdir, self.process = free_port(), workdir, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


class Postgres(RestartableEmbedded):
    """The bench's own embedded server, which its faults stop and start again."""

    def __init__(self, data_dir: Path):
        self.url = start_embedded(data_dir)
        super().__init__(data_dir)


class Fleet:
    def __init__(self, home: Path, env: dict, replicas: int):
        self.home, self.env, self.replicas = home, env, replicas
        self.port = int(env["MCPFLEET_PORT"])
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, check=check)

    def up(self, timeout: float = 180) -> None:
        log = open(self.home.parent / "gateway.log", "ab")
        self.process = subprocess.Popen([*CLI, "up", "--replicas", str(self.replicas)], cwd=ROOT, env=self.env,
                                        stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while len(self.children()) < self.replicas or not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not come up; see {self.home.parent / 'gateway.log'}")
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            return all(httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200 for _ in range(6))
        except httpx.HTTPError:
            return False

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children() if self.process else []

    def holder(self) -> psutil.Process | None:
        """The replica that runs the sandboxes: the one whose lease connection the database shows
        (sandbox/lease.py names it "mcpfleet sandbox manager pid N address")."""
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            names = [r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity "
                                                "WHERE application_name LIKE %s", (f"{APPLICATION} pid %",))]
        pids = {int(name.split()[len(APPLICATION.split()) + 1]) for name in names}
        return next((c for c in self.children() if c.pid in pids), None)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            replicas = self.children()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                # An overloaded fleet may not stop in time: its replicas must not outlive the bench.
                for process in [self.process, *replicas]:
                    try:
                        process.kill()
                    except (ProcessLookupError, psutil.NoSuchProcess):
                        pass
        # Its OpenBao, if the replica that started it was killed by a fault and could not stop it.
        EmbeddedOpenBao(self.home).stop_left()


def add_users(fleet: Fleet, count: int) -> dict[str, str]:
    def one(name: str) -> tuple[str, str]:
        fleet.cli("users", "add", name)
        return name, fleet.cli("keys", "create", name).stdout.strip().splitlines()[-1]

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, [f"load{n:03d}" for n in range(count)]))


def approvals(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT row_to_json(a)::text FROM approvals a ORDER BY 1")]


async def read_back(fleet: Fleet, keys: dict[str, str], written: dict[str, dict[str, str]]) -> list[str]:
    """Every file a successful write wrote, read through the gateway: its content, or what went wrong."""
    lost: list[str] = []
    gate = asyncio.Semaphore(16)

    async def one(client: httpx.AsyncClient, user: str, path: str, content: str) -> None:
        async with gate:
            for _ in range(3):  # a transient failure of the read is not a lost file
                ok, error, result = await call(client, fleet.url, keys[user], "workspace__read_file", {"path": path})
                if ok:
                    break
                await asyncio.sleep(1)
            text = "".join(p.get("text", "") for p in result.get("content") or [])
            if not ok or content not in text:
                lost.append(f"{user} {path}: {error or text[:80]}")

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one(client, u, p, c) for u, files in written.items() for p, c in files.items()))
    return lost


def audit_missing(fleet: Fleet, record: Record, timeout: float = 120) -> Counter:
    """Successful calls with no ok `tool.call` entry of the same tool and arguments (entries are
    appended in batches, queued through an outage: wait for them)."""
    wanted = Counter((c.tool, arguments_hash(c.arguments)) for c in record.calls if c.ok)
    deadline = time.monotonic() + timeout
    while True:
        entries = [json.loads(line) for line in fleet.cli("audit", "export", "--json").stdout.splitlines()]
        have = Counter((e["target"], (e.get("detail") or {}).get("args_sha256")) for e in entries
                       if e["action"] == "tool.call" and e["outcome"] == "ok")
        missing = Counter({k: n - have[k] for k, n in wanted.items() if n > have[k]})
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(3)



def sandbox_ids(fleet: Fleet, user: str) -> list[str]:
    return [s["id"] for s in json.loads(fleet.cli("sandboxes", "list", "--json").stdout) if s["user"] == user]


def kill_sandboxes(fleet: Fleet, ids: list[str]) -> None:
    """Kills these sandboxes outright (`runsc kill ... KILL`), as a crash inside gVisor would end them."""
    from sandbox.gvisor import choose

    for sandbox_id in ids:
        subprocess.run([choose().runsc, "--root", str(fleet.home / "runsc"), "kill", sandbox_id, "KILL"], check=False,
                       capture_output=True)


async def warm_up(fleet: Fleet, keys: dict[str, str], at_once: int = 4) -> None:
    """Every user's sandbox up before any fault: the load measures serving, not cold starts.
    A few start at once: one at a time, 100 users' cold starts would take longer than the load."""
    gate = asyncio.Semaphore(at_once)

    async def one(client: httpx.AsyncClient, key: str) -> None:
        async with gate:
            for _ in range(4):  # a cold start on a loaded machine may outlast one call's timeout
                ok, error, _ = await call(client, fleet.url, key, "workspace__list_dir", {"path": "."})
                if ok:
                    return
            raise RuntimeError(f"a warm-up call failed: {error}")

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one(client, key) for key in keys.values()))
