"""The images for Kubernetes (k8s/images/*.Dockerfile) build on this machine from a base made
locally (scripts/k8s-images.sh: no image registry is pulled from), and they run: the gateway's and
the operator's commands start, and the sandbox image's supervisor, given the config the operator
renders and a token file as a pod gets them, lets the gateway's client attach over TCP and runs the
built-in servers. Docker stands in for a node's container runtime (no cluster runs here); gVisor is
not asked of it, since the pod's RuntimeClass, not the image, brings gVisor."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from mcpfleet_operator.objects import supervisor_config
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.kubernetes_objects import sandbox_spec
from sandbox.servers import PRODUCT_SERVERS
from sandbox.tiers import Tier
from tests.conftest import docker_engine_missing, free_port

ROOT = Path(__file__).resolve().parent.parent
TAG = "test"


pytestmark = pytest.mark.skipif(docker_engine_missing() is not None, reason=str(docker_engine_missing()))


@pytest.fixture(scope="module")
def images() -> str:
    started = time.perf_counter()
    built = subprocess.run(["scripts/k8s-images.sh", TAG], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    print(f"\nthe three images built in {time.perf_counter() - started:.0f} s")
    return TAG


def docker_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "run", "--rm", *args], capture_output=True, text=True, timeout=timeout)


def test_the_gateway_and_operator_images_start_their_commands(images):
    gateway = docker_run(f"mcpfleet-gateway:{images}", "mcpfleet", "--version")
    assert gateway.returncode == 0 and gateway.stdout.startswith("mcpfleet "), gateway.stderr
    # What the gateway needs in a cluster: the kubernetes backend, Vault, telemetry, the wheel fetcher.
    imports = docker_run(f"mcpfleet-gateway:{images}", "python", "-c",
                         "import kubernetes_asyncio, hvac, opentelemetry.sdk, registry.fetch")  # fmt: skip
    assert imports.returncode == 0, imports.stderr
    operator = docker_run(f"mcpfleet-operator:{images}", "mcpfleet-operator", "--help")
    assert operator.returncode == 0 and "mcpfleet-operator" in operator.stdout, operator.stderr


def test_the_sandbox_image_has_its_init_and_its_modules_compiled(images):
    # The pod's root is read-only: modules not compiled in the image would be compiled at every start,
    # at both levels (the supervisor runs with -OO, its servers without).
    found = docker_run(f"mcpfleet-sandbox:{images}", "python", "-c",
                       "import importlib.util as u, pathlib as p; s = u.find_spec('sandbox.supervisor.main').origin; "
                       "print([p.Path(u.cache_from_source(s, optimization=o)).is_file() for o in ('', 2)])")  # fmt: skip
    assert found.stdout.strip() == "[True, True]", found.stdout + found.stderr
    tini = docker_run(f"mcpfleet-sandbox:{images}", "/usr/bin/tini-static", "--version")
    assert tini.returncode == 0 and "tini version" in tini.stdout, tini.stdout + tini.stderr


async def test_the_sandbox_image_serves_the_gateway_as_a_pod_would(images, tmp_path):
    spec = sandbox_spec(1, "acme", "alice", Tier("standard", 1.0, 512, 128, 1024), PRODUCT_SERVERS)
    config, token = tmp_path / "sandbox.json", tmp_path / "token"
    config.write_text(supervisor_config(spec["servers"]))
    token.write_text("t" * 43)
    for path in (tmp_path, config, token):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    port, name = free_port(), f"mcpfleet-image-test-{os.getpid()}"
    # As the operator's pod: read-only root, non-root, no capabilities, the config and token mounted.
    started = subprocess.run([
        "docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:7070", "--read-only",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/workspace:uid=1000,gid=1000",
        "--tmpfs", "/tmp", "-v", f"{config}:/etc/mcpfleet/sandbox.json:ro", "-v", f"{token}:/var/run/mcpfleet/token:ro",
        f"mcpfleet-sandbox:{images}", "/usr/bin/tini-static", "--", "python", "-s", "-P", "-OO", "-S", "-m", "sandbox.supervisor",
        "--listen", "0.0.0.0:7070", "--token-file", "/var/run/mcpfleet/token", "/etc/mcpfleet/sandbox.json",
    ], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert started.returncode == 0, started.stderr
    client = SupervisorClient(token="t" * 43)
    try:
        deadline = time.monotonic() + 60
        while True:  # Docker's port forwarder accepts before the supervisor listens: retry until attached
            try:
                await client.connect("127.0.0.1", port, timeout=5)
                break
            except SandboxUnavailable:
                assert time.monotonic() < deadline, "the supervisor in the image never let the gateway attach"
                await asyncio.sleep(0.3)
        while not all(s.get("state") == "ready" for s in client.servers.values()):
            assert time.monotonic() < deadline, client.servers
            await asyncio.sleep(0.3)
        assert set(client.servers) == {s.name for s in PRODUCT_SERVERS}
        await client.request("workspace", "tools/call", {"name": "write_file", "arguments": {"path": "a.txt", "content": "hi"}},
                             timeout=30)  # fmt: skip
        ran = await client.request("exec", "tools/call", {"name": "run", "arguments": {"command": "cat a.txt; id -u"}}, timeout=30)
        assert ran["structuredContent"]["stdout"] == "hi1000\n"
        # Node 22 where servers added from npm look for it.
        node = await client.request("exec", "tools/call", {"name": "run", "arguments": {"command": "/opt/mcpfleet/node/bin/node -p process.version"}},
                                    timeout=30)  # fmt: skip
        assert node["structuredContent"]["stdout"].startswith("v22."), node
        # Another token is refused: nothing is answered to it.
        stranger = SupervisorClient(token="u" * 43)
        with pytest.raises(SandboxUnavailable):
            await stranger.connect("127.0.0.1", port, timeout=5)
        await stranger.close()
    finally:
        await client.close()
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
