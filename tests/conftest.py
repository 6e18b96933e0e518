"""Shared fixtures: a real PostgreSQL (the embedded wheel) and a real running fleet."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from core.db import migrate, start_embedded
from core.openbao import EmbeddedOpenBao

ROOT = Path(__file__).resolve().parent.parent
# Every fleet a test opens would start its own llama-server (350 MB, two threads): only the model tests
# (tests/test_models*.py) ask for the local model, and they say so.
os.environ.setdefault("MCPFLEET_LOCAL_MODEL", "off")
MCPFLEET = [sys.executable, "-m", "cli"]


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded PostgreSQL server for the whole run (URL of its maintenance database)."""
    url = start_embedded(tmp_path_factory.mktemp("postgres"))
    return url.replace("/mcpfleet?", "/postgres?")


def fresh_database(postgres_url: str, prefix: str = "test") -> str:
    """A new, migrated database on the test server; returns its URL."""
    # Random, not counted: test modules that import this file get a second copy of its globals.
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres_url.replace("/postgres?", f"/{name}?")
    migrate(url)
    return url


@pytest.fixture(scope="session")
def database_url(postgres_url: str) -> str:
    return fresh_database(postgres_url)


@pytest.fixture(scope="session")
async def db_pool(database_url: str):
    from core.db import open_pool

    pool = await open_pool(database_url)
    yield pool
    await pool.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    """A gateway running as `mcpfleet up` in a child process, with its own home and database."""

    home: Path
    database_url: str
    port: int
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home / "gateway.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*MCPFLEET, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"mcpfleet {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def add_user(self, name: str, tenant: str = "default", role: str = "member") -> str:
        """Adds a user and returns a new API key of theirs."""
        self.cli("users", "add", name, "--tenant", tenant, "--role", role)
        return self.cli("keys", "create", name, "--tenant", tenant).stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([*MCPFLEET, "up", "--port", str(self.port)], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the gateway did not become ready:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if sig == signal.SIGTERM:
            # A gateway stopped cleanly stops the OpenBao it started; one it attached to, left by a
            # gateway killed before it, would outlive the suite: it goes too (the next start spawns one).
            EmbeddedOpenBao(self.home).stop_left()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, **env: str) -> Fleet:
    home = tmp_path_factory.mktemp("fleet")
    url = fresh_database(postgres_url, "fleet")
    port = free_port()
    environ = {
        **os.environ,
        "MCPFLEET_HOME": str(home),
        "DATABASE_URL": url,
        "MCPFLEET_PORT": str(port),
        # Pre-started sandboxes cost two cold starts per fleet: only the tests of the pool ask for them.
        "MCPFLEET_WARM_POOL_SIZE": "0",
        # So does a template sandbox, booted and checkpointed at the start: only the clone tests ask for it.
        "MCPFLEET_SANDBOX_CLONES": "off",
        **env,
    }
    return Fleet(home=home, database_url=url, port=port, env=environ)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Fleet]:
    """One gateway shared by the tests that only need a working fleet."""
    running = make_fleet(tmp_path_factory, postgres_url)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A sandbox home for one test module. Short: the gateway's socket lives under it and Unix
    socket paths stop at 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="mf-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def docker_engine_missing() -> str | None:
    """Why the Docker backend cannot be tested here, if it cannot."""
    try:
        import docker
    except ImportError:
        return "the docker SDK is not installed"
    try:
        docker.from_env(timeout=10).ping()
    except docker.errors.DockerException:
        return "no Docker Engine answers (scripts/docker.sh starts one)"
    return None
