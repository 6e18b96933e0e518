"""The kubernetes backend's manager (sandbox/kubernetes.py) against a stand-in API server.

No Kubernetes API server can run here: kmock's KubernetesEmulator stands in for one
(tests/kube_sandboxes.py says what it serves and what it does not prove). The gateway waits for
Ready by reading the object (GET), which kmock answers as the API server does.

The test plays the operator (tests/kube_sandboxes.py, `Operator`): for each McpSandbox that wants
to run it starts a real supervisor listening on loopback TCP with the token derived from the
object's uid, and sets status Ready with that endpoint. The supervisor, the channel and the
fixture MCP server are real. Every test runs under `asyncio.timeout(WITHIN)`, so a wait that never ends fails the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import kmock
import pytest

from core.settings import load_settings
from gateway.call_audit import CallAudit
from gateway.egress import SandboxEgress
from sandbox.errors import SandboxUnavailable
from sandbox.factory import kubernetes_sandboxes, sandbox_manager
from sandbox.kubernetes import KubernetesSandboxes
from sandbox.kubernetes_objects import ACTIVITY_ANNOTATION, GROUP, MERGE_PATCH, PLURAL, VERSION, sandbox_name, sandbox_token
from sandbox.servers import ServerSpec, StaticServers
from sandbox.tiers import Tier
from tests.kube_sandboxes import (
    KEY,
    NS,
    Operator,
    PodSupervisor,
    api_client,
    patches,
    serving_sandboxes,
    spec_pod,
    stored,
    write_kubeconfig,
)
from tests.test_egress import API, FETCHER, PUBLIC, TableResolver, test_host  # noqa: F401  (test_host is a fixture)
from tests.test_sandbox_supervisor import text, tool, write_fixture

TIER = Tier("standard", 1.0, 512, 128, 1024)


@pytest.fixture
async def api():
    async with serving_sandboxes() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="mcpf-k8s-", dir="/tmp") as d:
        yield Path(d)


async def tier_of(user_id: int) -> Tier:
    return TIER


def fixture_spec(workdir: Path) -> ServerSpec:
    return ServerSpec("fixture", (sys.executable, str(write_fixture(workdir))))


def manager(emulator, workdir: Path, **options) -> KubernetesSandboxes:
    return KubernetesSandboxes(api_client(emulator), StaticServers([fixture_spec(workdir)]), tier_of, KEY, namespace=NS, **options)


WITHIN = 15.0
"""Each test's bound: a test that waits longer fails instead of hanging."""


async def test_first_call_creates_the_sandbox_and_is_answered_once_ready(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes = manager(api, workdir)
        async with Operator(api, workdir):
            sandbox = await sandboxes.ensure(7, "acme", "alice")
            assert text(await tool(sandbox.client, "echo", text="in a pod")) == "in a pod"
        obj = stored(api, "acme-alice")
        assert obj["metadata"]["labels"]["mcpfleet.dev/user-id"] == "7"
        spec = obj["spec"]
        assert spec["user"] == "alice" and spec["tenant"] == "acme" and spec["userId"] == 7
        assert spec["tier"] == {"name": "standard", "cpus": 1.0, "memoryMb": 512, "pids": 128, "diskMb": 1024}
        assert spec["operatingMode"] == "Running"
        assert [s["name"] for s in spec["servers"]] == ["fixture"]
        assert spec["servers"][0]["command"][0] == sys.executable
        creates = [r for r in list(api) if r.method == kmock.method.POST]
        assert [r.url.path for r in creates] == [f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"]
        await sandboxes.close()


async def test_a_hibernated_sandbox_is_woken_and_the_call_waits(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes = manager(api, workdir)
        async with Operator(api, workdir) as operator:
            first = await sandboxes.ensure(8, "acme", "bob")
            assert await sandboxes.hibernate(8)
            for _ in range(100):
                if stored(api, "acme-bob").get("status", {}).get("state") == "Hibernated":
                    break
                await asyncio.sleep(0.05)
            assert not first.client.connected and "acme-bob" not in operator.pods
            again = await sandboxes.ensure(8, "acme", "bob")
            assert text(await tool(again.client, "echo", text="awake")) == "awake"
            assert operator.started == 2  # a new pod, on the same object
        modes = [r.data["spec"]["operatingMode"] for r in patches(api, "acme-bob") if "spec" in (r.data or {})]
        assert modes == ["Hibernated", "Running"]
        assert all(r.headers["Content-Type"] == MERGE_PATCH for r in patches(api, "acme-bob"))
        await sandboxes.close()


async def test_activity_is_stamped_in_batches(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes = manager(api, workdir, activity_interval=0.5)
        await sandboxes.start()
        async with Operator(api, workdir):
            await sandboxes.ensure(9, "acme", "carol")
            started = time.monotonic()
            for _ in range(20):
                sandbox = await sandboxes.ensure(9, "acme", "carol")
                await tool(sandbox.client, "echo", text="busy")
                await asyncio.sleep(0.05)
            calling = time.monotonic() - started
            await asyncio.sleep(0.6)
        stamps = [r for r in patches(api, "acme-carol") if "metadata" in (r.data or {})]
        # About 1.6 s of calls (longer on a loaded machine): a stamp per 0.5 s, not one per call.
        assert 1 <= len(stamps) <= calling / 0.5 + 2 < 20, (len(stamps), calling)
        assert stored(api, "acme-carol")["metadata"]["annotations"][ACTIVITY_ANNOTATION].endswith("Z")
        await sandboxes.close()


async def test_two_replicas_reach_the_same_sandbox(api, workdir):
    async with asyncio.timeout(WITHIN):
        one, two = manager(api, workdir), manager(api, workdir)
        async with Operator(api, workdir) as operator:
            a = await one.ensure(10, "acme", "dave")
            assert text(await tool(a.client, "echo", text="one")) == "one"
            b = await two.ensure(10, "acme", "dave")
            assert text(await tool(b.client, "echo", text="two")) == "two"
            # The supervisor keeps both: calls through either, at the same moment, each get their own answer.
            assert a.client.connected and b.client.connected
            answers = await asyncio.gather(*(tool(s.client, "echo", text=f"{n} {i}") for i in range(5)
                                             for n, s in (("one", a), ("two", b))))
            assert [text(r) for r in answers] == [f"{n} {i}" for i in range(5) for n in ("one", "two")]
            assert (await one.ensure(10, "acme", "dave")).client is a.client and a.client.connected
            assert operator.started == 1
        assert len([r for r in list(api) if r.method == kmock.method.POST]) == 1
        await one.close()
        await two.close()


async def test_a_conflict_on_create_takes_the_existing_sandbox(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes, other = manager(api, workdir), manager(api, workdir)
        async with Operator(api, workdir) as operator:
            # The other replica creates the object between this one's read (none yet) and its create.
            read = sandboxes._get

            async def read_then_lose_the_race(name):
                found = await read(name)
                if found is None:
                    await other.ensure(11, "acme", "erin")
                return found

            sandboxes._get = read_then_lose_the_race  # type: ignore[method-assign]
            sandbox = await sandboxes.ensure(11, "acme", "erin")
            assert text(await tool(sandbox.client, "echo", text="same")) == "same"
            assert operator.started == 1
        creates = [r for r in list(api) if r.method == kmock.method.POST]
        assert len(creates) == 2  # both tried; the second got 409 and took the first's
        assert stored(api, "acme-erin")["metadata"]["uid"] == sandbox.uid
        await other.close()
        await sandboxes.close()


class Approvals:
    """What the registry decides, changed by the test."""

    def __init__(self, servers: list[ServerSpec]):
        self.servers = tuple(servers)

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        return self.servers

    def provision(self, tools_dir: Path, servers) -> None:
        pass


async def test_a_change_of_approvals_reaches_the_object_and_the_running_pod(api, workdir):
    async with asyncio.timeout(WITHIN * 2):
        fixture = write_fixture(workdir)
        approvals = Approvals([ServerSpec("one", (sys.executable, str(fixture)))])
        sandboxes = KubernetesSandboxes(api_client(api), approvals, tier_of, KEY, namespace=NS)
        # Pods with a /workspace, where the gateway configures servers to run.
        async with Operator(api, workdir, spec_pod, pod=PodSupervisor) as operator:
            sandbox = await sandboxes.ensure(15, "acme", "ivan")
            assert text(await tool(sandbox.client, "echo", server="one", text="first")) == "first"
            approvals.servers = (ServerSpec("two", (sys.executable, str(fixture)), revision="r2"),)
            await sandboxes.servers_changed({15, 99})  # 99 has no sandbox: nothing to do for it
            spec_servers = stored(api, "acme-ivan")["spec"]["servers"]
            assert [(s["name"], s["version"]) for s in spec_servers] == [("two", "r2")]
            # The running pod was told at once, not at the user's next call.
            assert set(sandbox.client.servers) == {"two"}
            assert text(await tool(sandbox.client, "echo", server="two", text="second")) == "second"
            assert operator.started == 1
            # A hibernated sandbox's object follows too: the operator's next pod starts with it.
            assert await sandboxes.hibernate(15)
            approvals.servers = ()
            await sandboxes.servers_changed({15})
            assert stored(api, "acme-ivan")["spec"]["servers"] == []
        await sandboxes.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="the test host's network namespace needs root and ip")
async def test_a_declared_host_is_reached_over_the_pods_channel(api, workdir, test_host):
    """A server that declares a host reaches it through its supervisor's proxy and the channel: the
    connection is the gateway's (SandboxEgress, the fleet's policy), made from here to the test
    host in its network namespace (tests/test_egress.py; DNS is the table, as there). The pod needs
    no route out: the operator's NetworkPolicy gives it none. kmock stands in for the API server."""
    async with asyncio.timeout(WITHIN * 2):
        tools = workdir / "fetcher"
        tools.mkdir(exist_ok=True)
        (tools / "fetcher_tool.py").write_text(FETCHER)
        shutil.copy(test_host, tools / "ca.pem")
        fetcher = ServerSpec("fetcher", (sys.executable, str(tools / "fetcher_tool.py")), revision="egress-r1", egress=(API,))
        calls = CallAudit()
        egress = SandboxEgress(calls, resolver=TableResolver({API: [[PUBLIC]], "other.egress-test.example": [[PUBLIC]]}))
        sandboxes = KubernetesSandboxes(api_client(api), StaticServers([fetcher]), tier_of, KEY, namespace=NS, egress=egress)
        async with Operator(api, workdir, pod=PodSupervisor):
            sandbox = await sandboxes.ensure(14, "acme", "egress")
            fetched = text(await tool(sandbox.client, "fetch", server="fetcher", url=f"https://{API}/hello"))
            assert fetched == f"200 test host {PUBLIC} /hello host={API}", fetched
            undeclared = text(await tool(sandbox.client, "fetch", server="fetcher", url="https://other.egress-test.example/"))
            assert "403" in undeclared and "not among the hosts" in undeclared, undeclared
        # The object says which hosts (the operator renders them into the supervisor's config).
        assert stored(api, "acme-egress")["spec"]["servers"][0]["egress"] == [API]
        await sandboxes.close()
        connects = [(e.outcome, e.target, e.actor) for e in calls._queue if e.action == "egress.connect"]
        assert ("ok", f"{API}:443", "egress") in connects and ("refused", "other.egress-test.example:443", "egress") in connects, connects


async def test_no_ready_in_time_is_unavailable(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes = manager(api, workdir, start_timeout=0.5)
        with pytest.raises(SandboxUnavailable, match="not ready within"):
            await sandboxes.ensure(12, "acme", "frank")
        await sandboxes.close()


async def test_a_failed_sandbox_is_unavailable_at_once(api, workdir):
    async with asyncio.timeout(WITHIN):
        sandboxes = manager(api, workdir)
        ensure = asyncio.create_task(sandboxes.ensure(13, "acme", "gina"))
        operator = Operator(api, workdir)
        while ("acme-gina" not in {o["metadata"]["name"] for o in
               (await operator.objects.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL))["items"]}):  # fmt: skip
            await asyncio.sleep(0.02)
        await operator.set_status("acme-gina", {"state": "Failed", "reason": "the image cannot be pulled"})
        with pytest.raises(SandboxUnavailable, match="failed: the image cannot be pulled"):
            await ensure
        await operator.api.close()
        await sandboxes.close()


async def test_the_settings_choose_the_kubernetes_manager(api, workdir, tmp_path, monkeypatch):
    async with asyncio.timeout(WITHIN):
        key_file = tmp_path / "key"
        key_file.write_bytes(KEY + b"\n")
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api, namespace="elsewhere")
        monkeypatch.setenv("MCPFLEET_SANDBOX_BACKEND", "kubernetes")
        monkeypatch.setenv("MCPFLEET_K8S_NAMESPACE", NS)
        monkeypatch.setenv("MCPFLEET_SANDBOX_KEY_FILE", str(key_file))
        settings = load_settings(home=tmp_path)
        assert (settings.sandbox_backend, settings.k8s_namespace, settings.sandbox_key_file) == ("kubernetes", NS, key_file)
        with pytest.raises(RuntimeError, match="has no local manager"):
            sandbox_manager(settings, None, None)  # type: ignore[arg-type]

        sandboxes = await kubernetes_sandboxes(settings, StaticServers([fixture_spec(workdir)]), tier_of, kubeconfig=str(kubeconfig))
        async with Operator(api, workdir, pod=PodSupervisor):
            sandbox = await sandboxes.ensure(14, "acme", "hana")
            assert text(await tool(sandbox.client, "echo", text="configured")) == "configured"
        assert stored(api, "acme-hana")["spec"]["userId"] == 14
        await sandboxes.close()

        monkeypatch.delenv("MCPFLEET_SANDBOX_KEY_FILE")
        with pytest.raises(RuntimeError, match="needs MCPFLEET_SANDBOX_KEY_FILE"):
            await kubernetes_sandboxes(load_settings(home=tmp_path), StaticServers([]), tier_of)


def test_names_follow_the_contract():
    assert sandbox_name("acme", "alice") == "acme-alice"
    odd = sandbox_name("Acme Corp", "Alice@example.com")
    assert odd.startswith("acme-corp-alice-example-com-") and len(odd.rsplit("-", 1)[1]) == 8
    # A dash in the tenant would make names ambiguous ("a-b"+"c" vs "a"+"b-c"): hashed too.
    assert sandbox_name("a-b", "c") != sandbox_name("a", "b-c")
    assert len(sandbox_name("t" * 80, "u" * 80)) <= 63


def test_the_token_is_derived_from_the_uid():
    one = sandbox_token(KEY, NS, "acme-alice", "uid-1")
    assert one == sandbox_token(KEY, NS, "acme-alice", "uid-1")
    assert one != sandbox_token(KEY, NS, "acme-alice", "uid-2")
    assert one != sandbox_token(b"another key, as long as it is", NS, "acme-alice", "uid-1")
