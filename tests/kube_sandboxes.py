"""McpSandbox objects on a stand-in API server, and the operator played by the test: shared by the
kubernetes backend's tests (tests/test_sandbox_kubernetes.py) and the gateway's (tests/test_gateway_kubernetes.py).

No Kubernetes API server can run here: kmock's KubernetesEmulator stands in for one. It serves
McpSandbox objects at their real paths (/apis/mcpfleet.dev/v1alpha1/namespaces/NS/mcpsandboxes
[/NAME][/status]), keeps them in memory and applies merge patches; `McpSandboxApi` adds what the
API server does that the client relies on (a uid and 201 on create). What kmock does not prove:
the CRD's schema and validation, resourceVersion conflicts, RBAC, label selectors.

`Operator` plays the operator: for each McpSandbox that wants to run it starts a real supervisor
listening on loopback TCP with the token derived from the object's uid (the pod), and sets status
Ready with that endpoint; for one that is Hibernated it stops the pod. Its config says `traces` as
`spec.traces` does (the real operator's rendering of it is tests/test_operator_traces.py's).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
from kubernetes_asyncio import client as k8s

from sandbox.bundle import WORKSPACE
from sandbox.kubernetes_objects import GROUP, MERGE_PATCH, PLURAL, VERSION, sandbox_token
from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from tests.test_sandbox_supervisor import write_fixture
from tests.test_sandbox_supervisor_tcp import ListeningSupervisor

NS = "mcpfleet"
KEY = b"fleet-key-for-tests-0123456789"
RESOURCE = kmock.resource(GROUP, VERSION, PLURAL)


class McpSandboxApi(kmock.KubernetesEmulator):
    """kmock's emulator, plus what the API server does on create that clients rely on: it gives the
    object a uid and answers 201 Created (kubernetes_asyncio reads a create's body only then); and
    it takes `watch=True` for a watch as the API server does (Go's ParseBool), kmock only `true`."""

    async def __call__(self, raw_request):
        if raw_request.query.get("watch", "").lower() in ("true", "1"):
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.update_query(watch="true"))
        return await super().__call__(raw_request)

    async def _handle(self, request):
        creating = request.resource is not None and request.action == kmock.action.CREATE
        if creating and isinstance(request.data, dict):
            request.data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
        response = await super()._handle(request)
        if creating and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response


@contextlib.asynccontextmanager
async def serving_sandboxes() -> AsyncIterator[McpSandboxApi]:
    """The stand-in API server, serving on loopback, with McpSandboxes declared as the CRD declares
    them to an API server (listing none is an empty list, not 404)."""
    async with McpSandboxApi() as emulator, kmock.Server(emulator):
        emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = {}
        yield emulator


def write_kubeconfig(path: Path, emulator: McpSandboxApi, namespace: str | None = None) -> Path:
    """A kubeconfig that leads a client to the stand-in, as one leads it to a cluster."""
    context = f"{{cluster: kmock, user: kmock{f', namespace: {namespace}' if namespace else ''}}}"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{str(emulator.url).rstrip('/')}'}}}}]\n"
        "users: [{name: kmock, user: {token: t}}]\n"
        f"contexts: [{{name: kmock, context: {context}}}]\n"
    )
    return path


def api_client(emulator) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = str(emulator.url).rstrip("/")
    return k8s.ApiClient(configuration)


def fixture_pod(obj: dict[str, Any], directory: Path) -> list[ServerConfig]:
    """A pod running the fixture MCP server of tests/test_sandbox_supervisor.py, whatever the spec says."""
    return [ServerConfig(name="fixture", argv=[sys.executable, str(write_fixture(directory))])]


def spec_pod(obj: dict[str, Any], directory: Path) -> list[ServerConfig]:
    """A pod running the servers its McpSandbox names, as the gateway would configure them
    (`sandbox.servers.server_configs`): each `command` in /workspace."""
    return [
        ServerConfig(name=s["name"], argv=list(s["command"]), cwd=WORKSPACE, revision=s["version"])
        for s in obj["spec"].get("servers") or []
    ]


ROOT = Path(__file__).resolve().parent.parent


def pod_environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),
    }


class PodSupervisor(ListeningSupervisor):
    """The supervisor as a pod runs it, with a /workspace of its own: in a mount namespace, chrooted
    into a root that is the host's (each top-level directory bound in) plus the pod's directory at
    /workspace, where a pod has its workspace volume. `python` is the project's venv (the image's
    Python with the product's packages). Needs root, as the runsc tests do."""

    def __init__(self, directory: Path, servers: list[ServerConfig], token: str):
        super().__init__(directory, servers, token)
        # The image's environment: its Python (with the product's packages) first on PATH.
        SupervisorConfig(servers=servers, env=pod_environment(), init_timeout=30, token=token).write(self.config_path)

    workspace: Path | None = None
    """The pod's workspace volume (default: a new directory): the same one for every pod of an
    McpSandbox, as the operator mounts the same claim into each."""
    tools: Path | None = None
    """What the init container fetched (the pod's /opt/tools volume), if anything."""

    def start(self) -> None:
        root = self.config_path.parent / "root"
        root.mkdir()
        workspace = self.workspace or self.config_path.parent / "workspace"
        workspace.mkdir(exist_ok=True)
        argv = [sys.executable, "-m", "sandbox.supervisor", "--listen", f"127.0.0.1:{self.port}", str(self.config_path)]
        r = shlex.quote(str(root))
        # With a tools volume the pod's /opt is its own (the host's entries bound in) and /opt/tools the volume.
        tools = "" if self.tools is None else f"""mkdir -p {r}/opt/tools
for entry in /opt/*; do [ -d "$entry" ] && [ ! -L "$entry" ] && mkdir -p {r}/opt/"$(basename "$entry")" && mount --rbind "$entry" {r}/opt/"$(basename "$entry")"; done
mount --bind {shlex.quote(str(self.tools))} {r}/opt/tools
"""
        script = f"""set -e
mount -t tmpfs pod-root {r}
for entry in /*; do
  name=$(basename "$entry")
  if [ "$name" = opt ] && [ {int(self.tools is not None)} = 1 ]; then continue
  elif [ -L "$entry" ]; then ln -s "$(readlink "$entry")" {r}/"$name"
  elif [ -d "$entry" ]; then mkdir {r}/"$name"; mount --rbind "$entry" {r}/"$name"
  fi
done
{tools}mkdir {r}/workspace
mount --bind {shlex.quote(str(workspace))} {r}/workspace
exec chroot {r} {shlex.join(argv)}
"""
        # A slave, not private: the pod's copies of the host's mounts (its rbinds of / included) are
        # made while other sandboxes' workspaces are mounted, and only a slave's go with their unmount
        # on the host; a private copy would hold such a workspace's image as long as the pod lives.
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
            stdout=self.log, stderr=self.log, env=pod_environment(), cwd="/",
        )  # fmt: skip


PodServers = Callable[[dict[str, Any], Path], list[ServerConfig]]
"""The servers a pod starts with, from its McpSandbox and its own directory."""


class Operator:
    """What the operator does, as far as the gateway sees it: runs a pod (here a supervisor
    process on loopback) for each McpSandbox that wants to run, and reports it Ready."""

    def __init__(
        self, emulator, workdir: Path, pod_servers: PodServers = fixture_pod, *,
        pod: type[ListeningSupervisor] = ListeningSupervisor, holds: frozenset[str] = frozenset(),
        only: frozenset[str] | None = None, trials: bool = False, fetch_from: str | None = None,
    ):  # fmt: skip
        """`pod`: PodSupervisor for pods with a /workspace (the gateway configures servers there);
        `holds`: names of sandboxes it never makes ready (a pod that cannot be scheduled);
        `only`: the sandboxes it looks after (others, of earlier tests, are left as they are);
        `trials`: the registry's throwaway sandboxes (trial-*) too; `fetch_from`: the gateway whose
        artifact route the init container fetches published wheels from, as the operator's does
        (`python -m registry.fetch` with the pod's token), before the supervisor starts."""
        self.api = api_client(emulator)
        self.objects = k8s.CustomObjectsApi(self.api)
        self.workdir = workdir
        self.pod_servers = pod_servers
        self.pod = pod
        self.holds = set(holds)
        self.only = only
        self.trials = trials
        self.fetch_from = fetch_from
        self.fetched: dict[str, list[str]] = {}
        """What each pod's init container fetched, by sandbox name."""
        self.pods: dict[str, ListeningSupervisor] = {}
        self.started = 0
        self._task: asyncio.Task | None = None

    async def __aenter__(self):
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for pod in self.pods.values():
            pod.stop()
        await self.api.close()

    async def _run(self):
        while True:
            found = await self.objects.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
            for obj in found["items"]:
                await self.reconcile(obj)
            # A deleted object's pod goes with it (the operator's finalizer deletes it).
            for name in set(self.pods) - {o["metadata"]["name"] for o in found["items"]}:
                self.pods.pop(name).stop()
            await asyncio.sleep(0.05)

    async def reconcile(self, obj):
        name, uid = obj["metadata"]["name"], obj["metadata"]["uid"]
        status = obj.get("status") or {}
        trial = self.trials and name.startswith("trial-")
        if name in self.holds or (self.only is not None and name not in self.only and not trial):
            return
        if obj["spec"].get("operatingMode") == "Hibernated":
            pod = self.pods.pop(name, None)
            if pod is not None:
                pod.stop()
            if status.get("state") != "Hibernated":
                await self.set_status(name, {"state": "Hibernated", "endpoint": None, "conditions": [ready("False")]})
            return
        if name not in self.pods:
            directory = Path(tempfile.mkdtemp(prefix=f"pod-{name}-", dir=self.workdir))
            self.started += 1
            token = sandbox_token(KEY, NS, name, uid)
            pod = self.pod(directory, self.pod_servers(obj, directory), token)
            if obj["spec"].get("traces"):
                config = SupervisorConfig.from_json(pod.config_path.read_text())
                dataclasses.replace(config, traces=True).write(pod.config_path)
            if isinstance(pod, PodSupervisor):
                pod.workspace = self.workdir / f"workspace-{name}"
                digests = sorted({s["artifactSha256"] for s in obj["spec"].get("servers") or [] if s.get("artifactSha256")})
                if digests and self.fetch_from is not None:
                    pod.tools = directory / "tools"
                    failed = await self.init_container(name, token, pod.tools, digests)
                    if failed:
                        await self.set_status(name, {"state": "Failed", "reason": failed, "conditions": [ready("False")]})
                        self.holds.add(name)
                        return
            pod.start()
            self.pods[name] = pod
        if status.get("state") != "Running":
            endpoint = f"127.0.0.1:{self.pods[name].port}"
            await self.set_status(name, {"state": "Running", "endpoint": endpoint, "conditions": [ready("True")]})

    async def init_container(self, name: str, token: str, into: Path, digests: list[str]) -> str | None:
        """The init container's command as the operator writes it (`registry.fetch`); None if it
        fetched everything, else what it said."""
        (into.parent / "token").write_text(token)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "registry.fetch", "--gateway", self.fetch_from, "--sandbox", f"{NS}/{name}",
            "--token-file", str(into.parent / "token"), "--into", str(into), *digests,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=pod_environment(),
        )  # fmt: skip
        output, _ = await process.communicate()
        self.fetched[name] = digests if process.returncode == 0 else []
        return None if process.returncode == 0 else output.decode()[-500:]

    async def set_status(self, name, status):
        await self.objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, name, {"status": status}, _content_type=MERGE_PATCH
        )


def ready(status: str) -> dict:
    return {"type": "Ready", "status": status, "reason": "Test", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}


def stored(emulator, name: str) -> dict:
    return emulator.objects[RESOURCE, NS, name].raw


def patches(emulator, name: str) -> list:
    return [r for r in list(emulator) if r.method == kmock.method.PATCH and r.url.path.endswith(f"/{PLURAL}/{name}")]
