"""The gateway serving MCPFLEET_SANDBOX_BACKEND=kubernetes end to end: real `mcpfleet up`, real
PostgreSQL, the SDK's Client over Streamable HTTP, real supervisors on TCP.

The Kubernetes API server is a STAND-IN: no API server can run here, so kmock's emulator serves
the McpSandbox objects (tests/kube_sandboxes.py says what it does and what it does not prove), and
the gateway reaches it through a kubeconfig as it would a cluster. The test plays the operator
(`Operator`): for each McpSandbox that wants to run it starts a pod, here a real supervisor
listening on loopback TCP with the token derived from the object's uid, chrooted so that it has a
/workspace (the pod's volume, kept per McpSandbox across pods), running the servers the object
names; it reports the object Ready with that endpoint, and stops the pod when it is Hibernated.

The stand-in runs in this test's event loop: every test is async and runs blocking commands in a
thread, so the API answers the gateway meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio import client as k8s
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from registry.fetch import SANDBOX_HEADER, FetchError, fetch_into
from registry.service import BUILTIN_NAMESPACE, product_version
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxUnavailable
from sandbox.kubernetes_objects import GROUP, PLURAL, VERSION, sandbox_token
from tests.clients import connect, text_of
from tests.conftest import make_fleet
from tests.kube_sandboxes import (
    KEY,
    NS,
    Operator,
    PodSupervisor,
    api_client,
    serving_sandboxes,
    spec_pod,
    stored,
    write_kubeconfig,
)

ROOT = Path(__file__).resolve().parent.parent
WEATHER = ROOT / "tests" / "tool_projects" / "weather"
START_TIMEOUT_S = 10
"""MCPFLEET_K8S_START_TIMEOUT_S: how long a call waits for Ready. The stand-in operator takes ~0.1 s,
but a pod that first fetches and installs a published wheel took over 3 s with the suite's other
files running beside it; the test of a pod that never gets Ready waits this long."""
WITHIN = 90.0
"""Each test's bound: a wait that never ends fails the test instead of hanging it."""


@pytest.fixture(scope="module")
async def kube():
    """The stand-in for a Kubernetes API server (kmock), for the whole module."""
    async with serving_sandboxes() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def workdir():
    directory = Path(tempfile.mkdtemp(prefix="mcpf-k8sgw-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
async def gateway(kube, workdir, tmp_path_factory, postgres_url):
    """`mcpfleet up` with the kubernetes backend, pointed at the stand-in by a kubeconfig."""
    key_file = workdir / "sandbox.key"
    key_file.write_bytes(KEY + b"\n")
    kubeconfig = write_kubeconfig(workdir / "kubeconfig", kube)
    fleet = make_fleet(
        tmp_path_factory, postgres_url,
        MCPFLEET_SANDBOX_BACKEND="kubernetes", MCPFLEET_K8S_NAMESPACE=NS, MCPFLEET_SANDBOX_KEY_FILE=str(key_file),
        KUBECONFIG=str(kubeconfig), MCPFLEET_K8S_START_TIMEOUT_S=str(START_TIMEOUT_S),
        # The fixture server too, as a built-in that a test revokes.
        MCPFLEET_CONFORMANCE="on",
        # As in a gateway pod: no gVisor on this gateway's machine.
        PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "runsc").exists()),
    )  # fmt: skip
    await asyncio.to_thread(fleet.start)
    yield fleet
    # In a thread: the gateway stamps the last activity into the stand-in as it stops.
    await asyncio.to_thread(fleet.stop)


async def add_user(fleet, name: str, role: str = "member") -> str:
    return await asyncio.to_thread(fleet.add_user, name, "default", role)


def operator(kube, workdir: Path, *users: str, **options) -> Operator:
    """The operator's part for these users' sandboxes, with pods that run what their McpSandbox
    names in a /workspace of their own."""
    return Operator(kube, workdir, spec_pod, pod=PodSupervisor, only=frozenset(f"default-{u}" for u in users), **options)


async def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_a_client_lists_and_calls_tools_in_its_pod(gateway, kube, workdir):
    """The stand-in Kubernetes API server (kmock) holds the McpSandbox the gateway creates."""
    async with asyncio.timeout(WITHIN):
        alice = await add_user(gateway, "alice")
        async with operator(kube, workdir, "alice") as played, connect(gateway.mcp_url, alice) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            for name in ("workspace__write_file", "workspace__read_file", "exec__run"):
                assert name in names
            written = await client.call_tool("workspace__write_file", {"path": "hello.txt", "content": "from a pod"})
            assert not written.is_error, text_of(written)
            read = await client.call_tool("workspace__read_file", {"path": "hello.txt"})
            assert "from a pod" in text_of(read)
            assert played.started == 1
        # The file is in the pod's workspace volume, and the object says who and what, with the
        # tier from the database.
        assert (workdir / "workspace-default-alice" / "hello.txt").read_text() == "from a pod"
        spec = stored(kube, "default-alice")["spec"]
        assert (spec["tenant"], spec["user"], spec["operatingMode"]) == ("default", "alice", "Running")
        assert spec["tier"]["name"] == "standard" and spec["tier"]["memoryMb"] > 0
        assert {s["name"] for s in spec["servers"]} >= {"workspace", "exec"}


async def test_a_hibernated_sandbox_is_woken_by_a_call(gateway, kube, workdir):
    """kmock stands in for the Kubernetes API server; hibernation is asked by the CLI, as an admin would."""
    async with asyncio.timeout(WITHIN):
        carol = await add_user(gateway, "carol")
        async with operator(kube, workdir, "carol") as played:
            async with connect(gateway.mcp_url, carol) as client:
                written = await client.call_tool("workspace__write_file", {"path": "kept.txt", "content": "on the volume"})
                assert not written.is_error, text_of(written)
            done = await asyncio.to_thread(gateway.cli, "sandboxes", "hibernate", "carol")
            assert "done" in done.stdout, done.stdout
            assert stored(kube, "default-carol")["spec"]["operatingMode"] == "Hibernated"
            await wait_for(lambda: "default-carol" not in played.pods, "the pod to be stopped")
            async with connect(gateway.mcp_url, carol) as client:
                started = time.monotonic()
                read = await client.call_tool("workspace__read_file", {"path": "kept.txt"})
                woke_s = time.monotonic() - started
            assert "on the volume" in text_of(read), text_of(read)
            assert played.started == 2  # a new pod for the same object, on the same volume
            assert stored(kube, "default-carol")["spec"]["operatingMode"] == "Running"
            print(f"woken and answered in {woke_s:.2f} s")
            # Nothing to hibernate twice; the listing is kubectl's on this backend, and says so.
            listing = await asyncio.to_thread(gateway.cli, "sandboxes", "list", check=False)
            assert listing.returncode == 2 and f"kubectl -n {NS} get mcpsandboxes" in listing.stderr
            # Reclaiming deletes the object (the operator keeps or deletes the volume by its retention).
            reclaimed = await asyncio.to_thread(gateway.cli, "sandboxes", "reclaim", "carol")
            assert "done" in reclaimed.stdout, reclaimed.stdout
            listed = await played.objects.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
            assert "default-carol" not in {o["metadata"]["name"] for o in listed["items"]}


async def test_two_users_get_two_sandboxes_and_one_token_opens_only_its_own(gateway, kube, workdir):
    """Against the kmock stand-in for the Kubernetes API server, with real supervisors as pods."""
    async with asyncio.timeout(WITHIN):
        dave, erin = await add_user(gateway, "dave"), await add_user(gateway, "erin")
        async with operator(kube, workdir, "dave", "erin") as played:
            async with connect(gateway.mcp_url, dave) as client:
                await client.call_tool("workspace__write_file", {"path": "mine.txt", "content": "dave's secret"})
            async with connect(gateway.mcp_url, erin) as client:
                theirs = await client.call_tool("workspace__read_file", {"path": "mine.txt"})
                assert theirs.is_error and "dave's secret" not in text_of(theirs)
            dave_obj, erin_obj = stored(kube, "default-dave"), stored(kube, "default-erin")
            assert dave_obj["metadata"]["uid"] != erin_obj["metadata"]["uid"]
            assert dave_obj["spec"]["userId"] != erin_obj["spec"]["userId"]
            assert dave_obj["status"]["endpoint"] != erin_obj["status"]["endpoint"]
            assert set(played.pods) >= {"default-dave", "default-erin"}

            host, _, port = dave_obj["status"]["endpoint"].rpartition(":")
            erins_token = sandbox_token(KEY, NS, "default-erin", erin_obj["metadata"]["uid"])
            intruder = SupervisorClient(token=erins_token)
            with pytest.raises(SandboxUnavailable, match="did not say hello"):
                await intruder.connect(host, int(port), timeout=5)
            await intruder.close()
            # The same attempt with dave's own token is let in: it is the token that refused the other.
            owner = SupervisorClient(token=sandbox_token(KEY, NS, "default-dave", dave_obj["metadata"]["uid"]))
            await owner.connect(host, int(port), timeout=5)
            assert "workspace" in owner.servers
            await owner.close()
            # The gateway's own connection stayed attached meanwhile: dave's next call goes through it.
            async with connect(gateway.mcp_url, dave) as client:
                assert "dave's secret" in text_of(await client.call_tool("workspace__read_file", {"path": "mine.txt"}))


async def test_a_sandbox_that_never_gets_ready_is_a_clear_error_in_time(gateway, kube, workdir):
    """The kmock stand-in for the Kubernetes API server keeps the object; no pod ever becomes Ready."""
    async with asyncio.timeout(WITHIN):
        frank = await add_user(gateway, "frank")
        async with operator(kube, workdir, "frank", holds=frozenset({"default-frank"})) as played:
            async with connect(gateway.mcp_url, frank) as client:
                started = time.monotonic()
                with pytest.raises(MCPError) as refused:
                    await client.call_tool("workspace__list_dir", {"path": "."})
                waited = time.monotonic() - started
            assert "default-frank" not in played.pods
        message = refused.value.message
        assert refused.value.code == INTERNAL_ERROR, refused.value.error
        assert "Your sandbox could not be started" in message and f"not ready within {START_TIMEOUT_S}s" in message, message
        assert START_TIMEOUT_S - 0.5 <= waited <= START_TIMEOUT_S + 5, waited
        assert stored(kube, "default-frank")["spec"]["operatingMode"] == "Running"


async def test_a_revoked_approval_reaches_the_object_and_the_pod(gateway, kube, workdir):
    """kmock stands in for the Kubernetes API server: the McpSandbox's spec.servers follow the approvals."""
    async with asyncio.timeout(WITHIN):
        grace = await add_user(gateway, "grace")
        admin = await add_user(gateway, "kube-admin", role="admin")
        async with operator(kube, workdir, "grace") as played, connect(gateway.mcp_url, grace) as client:
            before = {t.name.split("__")[0] for t in (await client.list_tools()).tools}
            assert "conformance" in before
            path = f"/registry/v1/servers/{BUILTIN_NAMESPACE}/conformance/versions/{product_version()}/revoke"
            async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": f"Bearer {admin}"}) as http:
                revoked = await http.post(path, json={}, timeout=60)
            assert revoked.status_code == 200, revoked.text
            await wait_for(
                lambda: "conformance" not in {s["name"] for s in stored(kube, "default-grace")["spec"]["servers"]},
                "spec.servers to drop the revoked server",
            )
            after = {t.name.split("__")[0] for t in (await client.list_tools()).tools}
            assert "conformance" not in after and {"workspace", "exec"} <= after
            # The running pod was reconfigured (its supervisor says so), not replaced.
            pod = played.pods["default-grace"]
            await wait_for(lambda: "configured:" in Path(pod.log.name).read_text(), "the pod to be configured")
            configured = [line for line in Path(pod.log.name).read_text().splitlines() if "configured:" in line]
            assert "conformance" not in configured[-1] and "workspace: ready" in configured[-1], configured
            assert played.started == 1 and pod.process.poll() is None
            written = await client.call_tool("workspace__write_file", {"path": "still.txt", "content": "works"})
            assert not written.is_error, text_of(written)


def registry_cli(fleet, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mcpfleet ...` against the gateway, with this machine's PATH (building a wheel needs it)."""
    env = {**fleet.env, "PATH": os.environ["PATH"], "MCPFLEET_URL": fleet.base_url, "MCPFLEET_KEY": key}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
async def weather(gateway, kube, workdir) -> tuple[subprocess.CompletedProcess[str], str, dict[str, list[str]]]:
    """io.example/weather 1.0.0 published (not approved), its trial run in a throwaway pod by the
    stand-in operator: what `mcpfleet publish` said, the wheel's digest, and what each pod fetched."""
    publisher = await add_user(gateway, "kube-publisher", role="publisher")
    async with Operator(kube, workdir, spec_pod, pod=PodSupervisor, only=frozenset(), trials=True, fetch_from=gateway.base_url) as played:
        published = await asyncio.to_thread(registry_cli, gateway, publisher, "publish", str(WEATHER))
    async with httpx.AsyncClient(base_url=gateway.base_url, headers={"Authorization": f"Bearer {publisher}"}) as http:
        version = await http.get("/registry/v1/servers/io.example/weather/versions/1.0.0", timeout=30)
    assert version.status_code == 200, version.text
    return published, version.json()["artifact_sha256"], played.fetched


async def test_without_gvisor_on_the_gateway_the_trial_runs_in_a_throwaway_pod(gateway, kube, workdir, weather):
    """The gateway has no runsc: validation asks for a McpSandbox of its own (on the kmock stand-in
    for the Kubernetes API server), whose pod (the stand-in operator's, with the operator's init
    container command for real) fetches the wheel from the gateway and runs it; the trial lists its
    tools, the object is deleted, and the version is approved without --override, its tools pinned,
    and served to a user from the user's own pod."""
    async with asyncio.timeout(WITHIN * 2):
        published, sha, fetched = weather
        assert published.returncode == 0, published.stdout + published.stderr
        assert re.search(r"trial\s+\d+ tool\(s\); started in \d+ ms", published.stdout), published.stdout
        (trial,) = [name for name in fetched if name.startswith("trial-")]
        assert trial.startswith(f"trial-{sha[:12]}-") and fetched[trial] == [sha]
        api = api_client(kube)
        try:
            listed = await k8s.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
        finally:
            await api.close()
        assert trial not in {o["metadata"]["name"] for o in listed["items"]}, "the trial's McpSandbox is deleted after"
        admin = await add_user(gateway, "kube-approver", role="admin")
        approved = await asyncio.to_thread(registry_cli, gateway, admin, "registry", "approve", "io.example/weather", "1.0.0")
        assert approved.returncode == 0, approved.stdout + approved.stderr

        wendy = await add_user(gateway, "wendy")
        async with operator(kube, workdir, "wendy", fetch_from=gateway.base_url) as played, connect(gateway.mcp_url, wendy) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            weather_tools = [n for n in names if n.startswith("weather__")]
            assert weather_tools, names
            assert played.fetched["default-wendy"] == [sha]  # wendy's pod fetched the approved wheel itself


async def a_sandbox(objects, name: str, digests: list[str]) -> str:
    """A McpSandbox listing published servers with these digests, as the gateway writes them; its token."""
    servers = [{"name": f"s{i}", "prefix": f"s{i}", "version": d, "artifactSha256": d, "command": ["x"], "egress": []}
               for i, d in enumerate(digests)]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "McpSandbox", "metadata": {"name": name, "namespace": NS},
            "spec": {"user": name, "tenant": "default", "userId": 10**6 + len(name), "servers": servers, "operatingMode": "Hibernated"}}
    created = await objects.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    return sandbox_token(KEY, NS, name, created["metadata"]["uid"])


async def test_a_pod_fetches_the_wheels_its_sandbox_lists_and_nothing_else(gateway, kube, weather, tmp_path):
    """registry.fetch (the init container's client) against the gateway's artifact route; the
    McpSandboxes are on the kmock stand-in for the Kubernetes API server, made as the gateway makes them."""
    async with asyncio.timeout(WITHIN):
        _, sha, _ = weather
        api = api_client(kube)
        objects = k8s.CustomObjectsApi(api)
        try:
            token = await a_sandbox(objects, "art-fetcher", [sha, "e" * 64])
            bystander = await a_sandbox(objects, "art-bystander", [])
        finally:
            await api.close()
        (installed,) = await asyncio.to_thread(fetch_into, gateway.base_url, f"{NS}/art-fetcher", token, tmp_path / "tools", [sha])
        assert (installed / "weather_tool" / "server.py").is_file()

        async def get(digest: str, headers: dict[str, str]) -> httpx.Response:
            async with httpx.AsyncClient(base_url=gateway.base_url) as http:
                return await http.get(f"/registry/v1/artifacts/{digest}", headers=headers, timeout=30)

        def as_(sandbox: str, bearer: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {bearer}", SANDBOX_HEADER: sandbox}

        # Another sandbox's token for this sandbox, or a token made up: not this sandbox.
        for wrong in (bystander, token[:-2] + "AA", "x"):
            refused = await get(sha, as_(f"{NS}/art-fetcher", wrong))
            assert refused.status_code == 401 and "not the token of sandbox" in refused.json()["error"], refused.text
        # A sandbox with its own token asks for a wheel its spec does not list (another's): refused.
        refused = await get(sha, as_(f"{NS}/art-bystander", bystander))
        assert refused.status_code == 403 and "is not the artifact of any server" in refused.json()["error"], refused.text
        with pytest.raises(FetchError, match="403"):
            await asyncio.to_thread(fetch_into, gateway.base_url, f"{NS}/art-bystander", bystander, tmp_path / "other", [sha])
        # A user's own API key is no sandbox's token, and without the header nobody is asked about.
        admin = await add_user(gateway, "kube-art-admin", role="admin")
        for headers in ({"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {admin}"}, {SANDBOX_HEADER: f"{NS}/art-fetcher"}):
            refused = await get(sha, headers)
            assert refused.status_code == 401 and "authenticate as a sandbox" in refused.json()["error"], refused.text
        assert (await get(sha, as_(f"{NS}/art-fetcher", admin))).status_code == 401
        # The namespace is the gateway's: a sandbox elsewhere is never looked up.
        refused = await get(sha, as_("other/art-fetcher", token))
        assert refused.status_code == 403 and f"namespace {NS!r}" in refused.json()["error"], refused.text
        # Listed but never published: a clear 404; a path that is no digest: refused, nothing read.
        missing = await get("e" * 64, as_(f"{NS}/art-fetcher", token))
        assert missing.status_code == 404 and "no artifact" in missing.json()["error"], missing.text
        assert (await get("..%2F..%2Fetc", as_(f"{NS}/art-fetcher", token))).status_code in (403, 404)


async def test_a_pod_fetches_the_wheels_of_its_servers_dependency_layers(gateway, kube, weather, tmp_path):
    """A wheel listed in a server's `layerWheels` (its dependency layer) is served to that sandbox
    as its own wheel is, and unpacked into the layer's directory; to no other sandbox."""
    async with asyncio.timeout(WITHIN):
        _, sha, _ = weather
        layer = "a" * 64
        api = api_client(kube)
        objects = k8s.CustomObjectsApi(api)
        try:
            server = {"name": "s0", "prefix": "s0", "version": "f" * 64, "artifactSha256": "f" * 64, "layerSha256": layer,
                      "layerWheels": [sha], "command": ["x"], "egress": []}
            body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "McpSandbox", "metadata": {"name": "art-layered", "namespace": NS},
                    "spec": {"user": "art-layered", "tenant": "default", "userId": 10**6 + 99, "servers": [server],
                             "operatingMode": "Hibernated"}}
            created = await objects.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
            token = sandbox_token(KEY, NS, "art-layered", created["metadata"]["uid"])
            bystander = await a_sandbox(objects, "art-layer-bystander", [])
        finally:
            await api.close()
        (installed,) = await asyncio.to_thread(
            fetch_into, gateway.base_url, f"{NS}/art-layered", token, tmp_path / "tools", [], layers={layer: [sha]}
        )
        assert installed == tmp_path / "tools" / layer and (installed / "weather_tool" / "server.py").is_file()
        with pytest.raises(FetchError, match="403"):
            await asyncio.to_thread(fetch_into, gateway.base_url, f"{NS}/art-layer-bystander", bystander, tmp_path / "other",
                                    [], layers={layer: [sha]})


async def test_the_fleet_gives_its_kubernetes_sandboxes_the_egress_policy_and_trials_in_pods(kube, workdir, postgres_url, tmp_path, monkeypatch):
    """How the Fleet opens the kubernetes backend (in this process, against the kmock stand-in for
    the Kubernetes API server): pods' channels get the fleet's SandboxEgress, as the local manager's
    sandboxes do (tests/test_sandbox_kubernetes.py tunnels through one), and without runsc the
    registry's trials go to throwaway pods."""
    from core.settings import load_settings
    from gateway.egress import SandboxEgress
    from gateway.fleet import Fleet
    from sandbox.kubernetes import KubernetesSandboxes
    from sandbox.kubernetes_trials import KubernetesTrials
    from tests.conftest import fresh_database

    key_file = tmp_path / "sandbox.key"
    key_file.write_bytes(KEY + b"\n")
    for name, value in {
        "MCPFLEET_SANDBOX_BACKEND": "kubernetes", "MCPFLEET_K8S_NAMESPACE": NS, "MCPFLEET_SANDBOX_KEY_FILE": str(key_file),
        "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", kube)),
        "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "runsc").exists()),
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    # The client read KUBECONFIG as it was imported; a gateway process reads it as it starts.
    monkeypatch.setattr("kubernetes_asyncio.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", os.environ["KUBECONFIG"])
    async with asyncio.timeout(WITHIN), Fleet(load_settings(home=tmp_path), fresh_database(postgres_url, "kfleet")) as fleet:
        assert isinstance(fleet.manager, KubernetesSandboxes) and isinstance(fleet.manager.egress, SandboxEgress)
        assert fleet.manager.egress.calls is fleet.calls  # its connections are audited with the fleet's calls
        assert fleet.registry.backend is None and isinstance(fleet.registry.pods, KubernetesTrials)
        assert fleet.registry.pods.namespace == NS
