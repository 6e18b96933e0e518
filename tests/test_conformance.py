"""The MCP conformance suite (`@modelcontextprotocol/conformance`, server mode), both protocol revisions.

Two targets:

- the fixture server itself, served over Streamable HTTP: it must pass everything;
- the gateway, where a user's `conformance` server runs in their sandbox. The suite sends no
  credentials, so a loopback proxy in front of the gateway adds a test user's API key and
  changes nothing else. The suite calls the fixtures by their bare names (`test_simple_text`),
  so this gateway runs with `MCPFLEET_BARE_TOOL_NAMES=conformance`, the product's option for
  clients that call fixed names; the user also sees the other servers' namespaced tools.

A scenario may fail only if `tests/conformance/expected-failures.json` lists it (or the failing
check, as `scenario:check-id`) with its reason; an entry whose scenario now passes fails the
test too, so the list never outlives the problem. Needs only loopback networking.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = ROOT / "tests" / "conformance"
SUITE_BIN = SUITE_DIR / "node_modules" / ".bin"
EXPECTED_FAILURES = SUITE_DIR / "expected-failures.json"
REVISIONS = ("2025-11-25", "2026-07-28")
SERVER = "conformance"  # the fixture server's name in a sandbox

pytestmark = pytest.mark.timeout(900)


# -- running the suite and reading its verdicts ------------------------------------------------


@dataclass
class Verdicts:
    """What one run of the suite found: each scenario's failed checks (empty when it passed)."""

    failed: dict[str, dict[str, str]]  # scenario -> {check id: error message}
    passed_checks: dict[str, set[str]]  # scenario -> ids of the checks that succeeded
    output: str

    def summary(self) -> str:
        bad = sorted(s for s, checks in self.failed.items() if checks)
        return (
            f"{len(self.failed) - len(bad)} of {len(self.failed)} scenarios passed; failing: {', '.join(bad) or 'none'}"
        )


def run_suite(url: str, revision: str, out_dir: Path) -> Verdicts:
    if not (SUITE_BIN / "conformance").exists():
        pytest.fail(f"the conformance suite is not installed: run `npm ci --prefix {SUITE_DIR.relative_to(ROOT)}`")
    env = {**os.environ, "PATH": f"{SUITE_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    command = [str(SUITE_BIN / "conformance"), "server", "--url", url, "--suite", "all", "--spec-version", revision]
    done = subprocess.run(
        [*command, "--output-dir", str(out_dir)], env=env, cwd=SUITE_DIR, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    scenarios = re.findall(r"^=== Running scenario: (\S+) ===$", done.stdout, flags=re.MULTILINE)
    if not scenarios:
        pytest.fail(f"the conformance suite ran no scenario (exit {done.returncode}):\n{output[-5000:]}")
    checks_by_scenario: dict[str, list[dict[str, Any]]] = {}
    for result in out_dir.glob("server-*/checks.json"):
        scenario = re.sub(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$", "", result.parent.name.removeprefix("server-"))
        checks_by_scenario[scenario] = json.loads(result.read_text())
    failed: dict[str, dict[str, str]] = {}
    passed: dict[str, set[str]] = {}
    for scenario in scenarios:
        checks = checks_by_scenario.get(scenario)
        if checks is None:
            failed[scenario] = {scenario: "the scenario did not complete (no results were written)"}
            passed[scenario] = set()
            continue
        failed[scenario] = {c["id"]: c.get("errorMessage") or c["status"] for c in checks if c["status"] == "FAILURE"}
        passed[scenario] = {c["id"] for c in checks if c["status"] == "SUCCESS"}
    return Verdicts(failed=failed, passed_checks=passed, output=output)


def extension_scenarios(prefix: str) -> list[str]:
    """The suite's extension scenarios whose names start with `prefix` (they are on no revision's
    timeline, so `--suite all --spec-version` leaves them out: each runs on its own)."""
    env = {**os.environ, "PATH": f"{SUITE_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    listed = subprocess.run(
        [str(SUITE_BIN / "conformance"), "list", "--server"], env=env, cwd=SUITE_DIR, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout
    return re.findall(rf"^\s*- ({re.escape(prefix)}\S*) \[extension\]$", listed, flags=re.MULTILINE)


def run_scenarios(url: str, scenarios: list[str], out_dir: Path) -> Verdicts:
    """Each scenario on its own (`--scenario`), verdicts as `run_suite` reads them."""
    env = {**os.environ, "PATH": f"{SUITE_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "NO_COLOR": "1"}
    output = ""
    for scenario in scenarios:
        done = subprocess.run(
            [str(SUITE_BIN / "conformance"), "server", "--url", url, "--scenario", scenario, "--output-dir", str(out_dir)],
            env=env, cwd=SUITE_DIR, capture_output=True, text=True, timeout=300,
        )
        output += f"=== Running scenario: {scenario} ===\n{done.stdout}{done.stderr}"
    verdicts = Verdicts(failed={}, passed_checks={}, output=output)
    results = {
        re.sub(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$", "", r.parent.name.removeprefix("server-")): r
        for r in out_dir.glob("server-*/checks.json")
    }
    for scenario in scenarios:
        if scenario not in results:
            verdicts.failed[scenario] = {scenario: "the scenario did not complete (no results were written)"}
            verdicts.passed_checks[scenario] = set()
            continue
        checks = json.loads(results[scenario].read_text())
        verdicts.failed[scenario] = {c["id"]: c.get("errorMessage") or c["status"] for c in checks if c["status"] == "FAILURE"}
        verdicts.passed_checks[scenario] = {c["id"] for c in checks if c["status"] == "SUCCESS"}
    return verdicts


def expected_failures(target: str, revision: str) -> dict[str, str]:
    listed = json.loads(EXPECTED_FAILURES.read_text())[target][revision]
    for key, reason in listed.items():
        assert isinstance(reason, str) and reason.strip(), f"{EXPECTED_FAILURES.name}: {key!r} needs a reason"
    return listed


def judge(verdicts: Verdicts, expected: dict[str, str], what: str) -> None:
    """Fail on a failure nobody expected, and on an expected failure that no longer happens."""
    unexpected: list[str] = []
    for scenario, checks in sorted(verdicts.failed.items()):
        if scenario in expected:
            continue
        for check, message in sorted(checks.items()):
            if f"{scenario}:{check}" not in expected:
                unexpected.append(f"  {scenario}:{check}: {message}")
    stale: list[str] = []
    for key, reason in sorted(expected.items()):
        scenario, _, check = key.partition(":")
        if scenario not in verdicts.failed:
            stale.append(f"  {key}: the scenario did not run at this revision")
        elif not check and not verdicts.failed[scenario]:
            stale.append(f"  {key}: passes now (listed because: {reason})")
        elif check and check in verdicts.passed_checks[scenario]:
            stale.append(f"  {key}: passes now (listed because: {reason})")
    problems = []
    if unexpected:
        problems.append("failures not listed in expected-failures.json:\n" + "\n".join(unexpected))
    if stale:
        problems.append(
            "expected failures that no longer fail; remove them from expected-failures.json:\n" + "\n".join(stale)
        )
    if problems:
        pytest.fail(
            f"{what}: {verdicts.summary()}\n"
            + "\n".join(problems)
            + f"\n\nsuite output (end):\n{verdicts.output[-4000:]}"
        )


# -- the fixture server, served directly ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def fixture_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("conformance-fixture") / "server.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mcp_servers.conformance", "--transport", "streamable-http", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.parametrize("revision", REVISIONS)
def test_fixture_server(fixture_url: str, revision: str, tmp_path: Path) -> None:
    verdicts = run_suite(fixture_url, revision, tmp_path)
    judge(verdicts, expected_failures("fixture", revision), f"fixture server at {revision}")


# -- the gateway, behind a proxy that supplies the key -------------------------------------------

class KeyProxy:
    """A byte-level loopback proxy: each HTTP/1.1 request goes to the gateway exactly as the suite
    sent it, with one header more, the test user's `Authorization`; responses come back untouched.

    Byte-level on purpose: an HTTP library in between would normalise what the suite sends
    (header whitespace, for one) and hide what the gateway does with it."""

    def __init__(self, upstream_port: int, api_key: str):
        self.upstream_port = upstream_port
        self.auth = f"Authorization: Bearer {api_key}\r\n".encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        back = asyncio.create_task(self._pipe(up_reader, writer))
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                request_line, _, fields = head.partition(b"\r\n")
                kept = [f for f in fields.split(b"\r\n") if f and not f.lower().startswith(b"authorization:")]
                length = next((int(f.split(b":", 1)[1]) for f in kept if f.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                up_writer.write(request_line + b"\r\n" + b"".join(f + b"\r\n" for f in kept) + self.auth + b"\r\n" + body)
                await up_writer.drain()
        finally:
            up_writer.close()
            await back
            writer.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()


def serve_in_thread(proxy: KeyProxy, port: int) -> Callable[[], None]:
    """Runs the proxy on its own event loop in a thread; returns a function that stops it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def main() -> None:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", port)
        started.set()
        async with server:
            try:
                await server.serve_forever()
            except asyncio.CancelledError:
                pass  # stop() cancels it: the proxy's normal end

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="key-proxy", daemon=True)
    thread.start()
    started.wait(10)

    def stop() -> None:
        for task in asyncio.all_tasks(loop):
            loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)

    return stop


@pytest.fixture(scope="module")
def conformance_fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Any]:
    """A gateway of its own for the suite, which calls the fixtures by their bare names
    (`test_simple_text`): this fleet shows the `conformance` server's tools unprefixed."""
    from tests.conftest import make_fleet

    # The fixture server is off for tenants unless enabled: this fleet enables it for all.
    fleet = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_BARE_TOOL_NAMES=SERVER, MCPFLEET_CONFORMANCE="on")
    fleet.start()
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def gateway_view(conformance_fleet: Any) -> Iterator[str]:
    """The URL the suite talks to: the key-adding proxy in front of the gateway."""
    api_key = conformance_fleet.add_user("conformance-suite")
    port = free_port()
    stop = serve_in_thread(KeyProxy(conformance_fleet.port, api_key), port)
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/mcp"
        _require_conformance_server(url)
        yield url
    finally:
        stop()


def _require_conformance_server(url: str) -> None:
    """A clear failure up front when the gateway offers this user no conformance server."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    response = httpx.post(
        url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}},
        headers={
            "MCP-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/list",
            "Accept": "application/json, text/event-stream",
        },
        timeout=120,
    )
    text = response.text
    if "test_simple_text" not in text:
        pytest.fail(
            f"the gateway offers the test user no `{SERVER}` server (tools/list answered HTTP "
            f"{response.status_code}: {text[:1000]})"
        )


@pytest.mark.parametrize("revision", REVISIONS)
def test_gateway(gateway_view: str, revision: str, tmp_path: Path) -> None:
    verdicts = run_suite(gateway_view, revision, tmp_path)
    judge(verdicts, expected_failures("gateway", revision), f"gateway at {revision}")


def test_gateway_tasks_extension(gateway_view: str, tmp_path: Path) -> None:
    """The Tasks extension (SEP-2663) through the gateway: every `tasks-*` scenario of the suite."""
    scenarios = extension_scenarios("tasks-")
    assert len(scenarios) >= 10, f"the suite lists fewer tasks scenarios than expected: {scenarios}"
    verdicts = run_scenarios(gateway_view, scenarios, tmp_path)
    judge(verdicts, expected_failures("gateway", "tasks-extension"), "gateway, tasks extension")
