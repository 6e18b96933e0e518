"""The MCP conformance suite (`@modelcontextprotocol/conformance`, server mode), both protocol revisions.

Two targets:

- the fixture server itself, served over Streamable HTTP: it must pass everything;
- the gateway, where a user's `conformance` server runs in their sandbox. The suite sends no
  credentials and calls fixtures by their bare names, so a loopback proxy in front of the
  gateway adds a test user's API key and shows the suite that one server's view of the
  gateway: it prefixes tool and prompt names with `conformance__` on the way in and strips
  the prefix (and other servers' entries) from listings on the way out. Everything else,
  headers and streams included, passes through untouched, except that header values lose
  the whitespace around them, as HTTP lets any intermediary do.

A scenario may fail only if `tests/conformance/expected-failures.json` lists it (or the failing
check, as `scenario:check-id`) with its reason; an entry whose scenario now passes fails the
test too, so the list never outlives the problem. Needs only loopback networking.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
SUITE_DIR = ROOT / "tests" / "conformance"
SUITE_BIN = SUITE_DIR / "node_modules" / ".bin"
EXPECTED_FAILURES = SUITE_DIR / "expected-failures.json"
REVISIONS = ("2025-11-25", "2026-07-28")
SERVER = "conformance"  # the fixture server's name in a sandbox
PREFIX = f"{SERVER}__"

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


# -- the gateway, behind a proxy that supplies the key and one server's view ---------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
_PREFIXED_METHODS = {"tools/call", "prompts/get"}


def _to_gateway(message: Any) -> Any:
    """Name the conformance server's tools and prompts as the gateway does."""
    if isinstance(message, list):
        return [_to_gateway(m) for m in message]
    if not isinstance(message, dict) or not isinstance(message.get("params"), dict):
        return message
    params = message["params"]
    if message.get("method") in _PREFIXED_METHODS and isinstance(params.get("name"), str):
        params["name"] = PREFIX + params["name"]
    if message.get("method") == "completion/complete":
        ref = params.get("ref")
        if isinstance(ref, dict) and ref.get("type") == "ref/prompt" and isinstance(ref.get("name"), str):
            ref["name"] = PREFIX + ref["name"]
    return message


def _from_gateway(message: Any) -> Any:
    """Show only the conformance server's tools and prompts, under their own names."""
    if isinstance(message, list):
        return [_from_gateway(m) for m in message]
    result = message.get("result") if isinstance(message, dict) else None
    if isinstance(result, dict):
        for key in ("tools", "prompts"):
            if isinstance(result.get(key), list):
                result[key] = [
                    {**entry, "name": entry["name"][len(PREFIX) :]}
                    for entry in result[key]
                    if isinstance(entry, dict) and str(entry.get("name", "")).startswith(PREFIX)
                ]
    return message


class GatewayView:
    """ASGI app: forwards every request to the gateway with the user's key, names mapped."""

    def __init__(self, upstream: str, api_key: str):
        self.upstream = upstream
        self.api_key = api_key
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP and k.lower() != "authorization"]
        if body:
            body, headers = self._rewrite_request(body, headers)
        headers.append(("authorization", f"Bearer {self.api_key}"))
        query = scope.get("query_string", b"").decode("latin-1")
        request = self.client.build_request(
            scope["method"], self.upstream + (f"?{query}" if query else ""), headers=headers, content=body
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _respond(send, 502, [(b"content-type", b"text/plain")], f"gateway unreachable: {exc}".encode())
            return
        try:
            kind = response.headers.get("content-type", "")
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-encoding"
            ]
            if kind.startswith("application/json"):
                data = await response.aread()
                try:
                    data = json.dumps(_from_gateway(json.loads(data))).encode()
                except ValueError:
                    pass
                await _respond(send, response.status_code, out_headers, data)
                return
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            chunks = (
                _rewrite_sse(response.aiter_bytes()) if kind.startswith("text/event-stream") else response.aiter_bytes()
            )
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    def _rewrite_request(self, body: bytes, headers: list[tuple[str, str]]) -> tuple[bytes, list[tuple[str, str]]]:
        try:
            message = json.loads(body)
        except ValueError:
            return body, headers
        method = message.get("method") if isinstance(message, dict) else None
        if method in _PREFIXED_METHODS:
            headers = [(k, PREFIX + v if k.lower() == "mcp-name" else v) for k, v in headers]
        return json.dumps(_to_gateway(message)).encode(), headers


async def _rewrite_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Rewrite each `data:` line of an event stream as it arrives, keeping everything else."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            yield b"".join(_rewrite_sse_line(line) + b"\n" for line in lines)
    if pending:
        yield _rewrite_sse_line(pending)


def _rewrite_sse_line(line: bytes) -> bytes:
    if not line.startswith(b"data:"):
        return line
    payload = line[5:].strip()
    try:
        return (
            b"data: "
            + json.dumps(_from_gateway(json.loads(payload))).encode()
            + (b"\r" if line.endswith(b"\r") else b"")
        )
    except ValueError:
        return line


async def _respond(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def gateway_view(fleet: Any) -> Iterator[str]:
    """The URL the suite talks to: a loopback proxy in front of the gateway, as a conformance user."""
    api_key = fleet.add_user("conformance-suite")
    port = free_port()
    app = GatewayView(fleet.mcp_url, api_key)
    # h11 drops the optional whitespace around header values, as any HTTP intermediary may.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway-view", daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}/mcp"
        _require_conformance_server(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
