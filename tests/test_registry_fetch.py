"""registry.fetch, the init container of a pod with published servers: real downloads over HTTP from a
local server that plays the gateway's artifact route as its contract says (a token and a sandbox
header or 401), to corrupt what it serves at will. The real route, against this same client, is
tested in tests/test_gateway_kubernetes.py (`test_a_pod_fetches_the_wheels_its_sandbox_lists_and_nothing_else`)."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.fetch import SANDBOX_HEADER, FetchError, fetch_into
from tests.test_registry_artifacts import WHEEL, wheel_bytes

SHA = hashlib.sha256(WHEEL).hexdigest()
OTHER = wheel_bytes({"other/__init__.py": "X = 2\n", "other-1.dist-info/METADATA": "Name: other\n"})
TOKEN = "the-sandbox-token"


class Gateway(http.server.BaseHTTPRequestHandler):
    served: dict[str, bytes] = {}
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization", ""),
                          "sandbox": self.headers.get(SANDBOX_HEADER, "")})
        sha = self.path.rsplit("/", 1)[-1]
        if self.headers.get("Authorization") != f"Bearer {TOKEN}" or self.headers.get(SANDBOX_HEADER) != "mcpfleet/acme-alice":
            self.send_response(401)
            self.end_headers()
            return
        body = self.served.get(sha)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def gateway() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    Gateway.served, Gateway.seen = {SHA: WHEEL}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_wheel_is_fetched_by_digest_checked_and_installed_under_it(gateway: str, tmp_path: Path) -> None:
    (installed,) = fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [SHA])
    assert installed == tmp_path / "tools" / SHA
    assert (installed / "demo_tool" / "server.py").is_file() and (installed / "extra_module.py").is_file()
    assert Gateway.seen == [{"path": f"/registry/v1/artifacts/{SHA}", "auth": f"Bearer {TOKEN}", "sandbox": "mcpfleet/acme-alice"}]
    # A restarted init container keeps what is installed (no second download).
    fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [SHA])
    assert len(Gateway.seen) == 1
    assert [p.name for p in (tmp_path / "tools").iterdir()] == [SHA]  # no partial files left


def test_bytes_that_are_not_the_digest_are_refused(gateway: str, tmp_path: Path) -> None:
    Gateway.served = {SHA: OTHER}  # a changed store, or a man in the middle
    with pytest.raises(FetchError, match="refusing it"):
        fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [SHA])
    assert list((tmp_path / "tools").iterdir()) == []


def test_a_wrong_token_or_a_missing_wheel_fails_and_installs_nothing(gateway: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="401"):
        fetch_into(gateway, "mcpfleet/acme-alice", "not-the-token", tmp_path / "tools", [SHA])
    with pytest.raises(FetchError, match="404"):
        fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", ["0" * 64])
    with pytest.raises(FetchError, match="not sha256"):
        fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", ["../etc"])
    assert list((tmp_path / "tools").iterdir()) == []


def test_the_init_containers_command_line(gateway: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    argv = [sys.executable, "-m", "registry.fetch", "--gateway", gateway, "--sandbox", "mcpfleet/acme-alice",
            "--token-file", str(tmp_path / "token"), "--into", str(tmp_path / "tools"), SHA]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tools" / SHA / "demo_tool" / "__init__.py").is_file()
    Gateway.served = {}
    failed = subprocess.run([*argv[:-1], "1" * 64], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "404" in failed.stderr  # the pod's init container fails: the operator's Failed


def test_a_dependency_layer_is_fetched_wheel_by_wheel_into_one_directory(gateway: str, tmp_path: Path) -> None:
    other = hashlib.sha256(OTHER).hexdigest()
    Gateway.served = {SHA: WHEEL, other: OTHER}
    layer = "e" * 64
    (installed,) = fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [], layers={layer: [SHA, other]})
    assert installed == tmp_path / "tools" / layer
    assert (installed / "demo_tool" / "server.py").is_file() and (installed / "other" / "__init__.py").is_file()
    assert [p.name for p in (tmp_path / "tools").iterdir()] == [layer]


def test_a_layer_wheel_that_is_not_its_digest_leaves_no_layer(gateway: str, tmp_path: Path) -> None:
    other = hashlib.sha256(OTHER).hexdigest()
    Gateway.served = {SHA: WHEEL, other: WHEEL}  # the second wheel of the layer swapped
    with pytest.raises(FetchError, match="refusing it"):
        fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [], layers={"e" * 64: [SHA, other]})
    assert not (tmp_path / "tools" / ("e" * 64)).exists()  # only a partial dir, never under the layer's digest
    with pytest.raises(FetchError, match="not sha256"):
        fetch_into(gateway, "mcpfleet/acme-alice", TOKEN, tmp_path / "tools", [], layers={"e" * 64: ["../x"]})


def test_the_init_containers_layer_argument(gateway: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    layer = "f" * 64
    argv = [sys.executable, "-m", "registry.fetch", "--gateway", gateway, "--sandbox", "mcpfleet/acme-alice",
            "--token-file", str(tmp_path / "token"), "--into", str(tmp_path / "tools"), f"--layer={layer}={SHA}", SHA]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tools" / layer / "demo_tool" / "__init__.py").is_file()
