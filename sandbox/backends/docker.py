"""Sandboxes as Docker containers with gVisor as their runtime, through the `docker` SDK.

A container is what `sandbox.bundle` makes an OCI bundle of: the same binds,
environment, supervisor and limits, from an image that holds only the skeleton
root (`write_root`), imported locally and tagged by a hash of its content. The
engine runs the `runsc` runtime that scripts/docker.sh registers, with no
network and host Unix sockets that may be opened, as the runsc backend does.

Hibernation keeps memory: `docker checkpoint create` with this runtime saves
the whole sandbox (processes, /tmp) and `docker start --checkpoint` resumes it,
with a counter held in a server's memory intact (tests/test_sandbox_docker.py).
The engine keeps the image with the stopped container, since it refuses to
restore from a directory of our choosing: `image_dir` only holds a note naming
it, and the image goes once the sandbox is resumed or its container removed.
Checkpoints are still an experimental API of the engine; scripts/docker.sh
turns it on.

Containers are named by sandbox id and labelled with the fleet they belong to
(its home), so `list()` and `kill_strays()` see only this fleet's.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.types import LogConfig, Mount, Ulimit

from sandbox.backends.base import Container, SandboxSpec
from sandbox.bundle import (
    HOSTNAME,
    INIT_CWD,
    OPEN_FILES,
    ROOT_READONLY,
    SUPERVISOR_CAPS,
    environment,
    host_pids,
    sandbox_binds,
    supervisor_argv,
    write_root,
)
from sandbox.errors import SandboxUnavailable
from sandbox.runtime import PythonRuntime, current_python

log = logging.getLogger(__name__)

IMAGE = "mcpfleet-sandbox"
LABEL = "dev.mcpfleet.sandbox"
FLEET_LABEL = "dev.mcpfleet.fleet"
DIRECTORY_LABEL = "dev.mcpfleet.directory"
CPU_QUOTA_LABEL = "dev.mcpfleet.cpu-quota-us"
"""The sandbox's own CPU quota, applied by `settle()` (it starts with more)."""
CHECKPOINT = "hibernated"
CHECKPOINT_NOTE = "docker-checkpoint.json"
COMMAND_TIMEOUT = 60
CHECKPOINT_TIMEOUT = 300
CGROUP_ROOT = Path("/sys/fs/cgroup")
_STATUSES = {"running": "running", "restarting": "running", "created": "created", "paused": "paused"}


class DockerError(SandboxUnavailable):
    """The Docker Engine refused, failed, or did not answer; its message is one sentence, the
    engine's own (gVisor's stack traces among it) goes to the log."""


class DockerBackend:
    name = "docker"
    keeps_memory = True

    def __init__(
        self,
        fleet: str,
        *,
        runtime: str = "runsc",
        start_cpus: float | None = float(os.cpu_count() or 1),
        python: PythonRuntime | None = None,
        base_url: str | None = None,
    ):
        """`fleet` tells this fleet's containers from others on the same engine (its home, say).

        A sandbox starts with `start_cpus` of CPU (None: its own limit) until `settle()`, as with
        runsc. `base_url` is the engine's address (default: DOCKER_HOST, else its local socket);
        the engine must run on this host, since sandboxes bind its paths.
        """
        self.fleet = fleet
        self.runtime = runtime
        self.start_cpus = start_cpus
        self.python = python or current_python()
        self.base_url = base_url
        self._docker: docker.DockerClient | None = None
        self._images: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()

    # -- SandboxBackend -----------------------------------------------------------------

    async def start(self, spec: SandboxSpec) -> None:
        await asyncio.to_thread(self._start, spec)

    async def destroy(self, sandbox_id: str, *, grace: float = 0.0) -> None:
        await asyncio.to_thread(self._destroy, sandbox_id, grace)

    async def settle(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._settle, sandbox_id)

    async def is_alive(self, sandbox_id: str) -> bool:
        attrs = await asyncio.to_thread(self._inspect, sandbox_id)
        return attrs is not None and attrs["State"]["Running"] and not attrs["State"]["Paused"]

    async def list(self) -> list[Container]:
        return await asyncio.to_thread(self._list)

    async def checkpoint(self, sandbox_id: str, image_dir: Path) -> None:
        """Save the sandbox's whole state (memory included) and stop it.

        gVisor refuses (and the sandbox dies) while it holds a host socket: detach
        the supervisor's channel first (`SupervisorClient.detach()`).
        """
        await asyncio.to_thread(self._checkpoint, sandbox_id, image_dir)

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Resume the container that `checkpoint` saved; its binds and limits are those it was created with."""
        await asyncio.to_thread(self._restore, spec.id, image_dir)

    def kill_strays(self, keep: set[str]) -> int:
        strays = [c for c in self._containers() if c.name not in keep]
        for container in strays:
            log.info("removing container %s: no sandbox of this fleet has it", container.name)
            self._remove(container.name)
        return len(strays)

    async def memory_bytes(self, sandbox_id: str) -> int | None:
        """Memory charged to the sandbox's cgroup, less the page cache the kernel may reclaim:
        what its memory limit is held against (gVisor keeps a sandbox's memory in a file, so
        the resident sets of its host processes miss most of it)."""
        return await asyncio.to_thread(self._memory_bytes, sandbox_id)

    # -- the engine ----------------------------------------------------------------------

    def _client(self) -> docker.DockerClient:
        with self._lock:
            if self._docker is None:
                with _engine_errors("connecting to the Docker Engine (scripts/docker.sh starts one)"):
                    if self.base_url:
                        self._docker = docker.DockerClient(base_url=self.base_url, timeout=COMMAND_TIMEOUT)
                    else:
                        self._docker = docker.from_env(timeout=COMMAND_TIMEOUT)
            return self._docker

    def _image(self, uid: int, gid: int) -> str:
        """The skeleton root as an image, imported unless the engine has it already."""
        if (uid, gid) in self._images:
            return self._images[(uid, gid)]
        with tempfile.TemporaryDirectory(prefix="mcpfleet-root-") as tmp:
            write_root(Path(tmp) / "root", self.python, uid, gid)
            data = _reproducible_tar(Path(tmp) / "root")
        tag = hashlib.sha256(data).hexdigest()[:16]
        client = self._client()
        with _engine_errors("importing the sandbox image"):
            try:
                client.images.get(f"{IMAGE}:{tag}")
            except docker.errors.ImageNotFound:
                client.api.import_image_from_data(data, repository=IMAGE, tag=tag)
                log.info("imported the sandbox image %s:%s", IMAGE, tag)
        self._images[(uid, gid)] = f"{IMAGE}:{tag}"
        return self._images[(uid, gid)]

    def _start(self, spec: SandboxSpec) -> None:
        limits = spec.limits
        quota = limits.cpu_quota_us
        if self.start_cpus is not None and self.start_cpus > limits.cpus:
            start_quota = int(self.start_cpus * limits.cpu_period_us)
        else:
            start_quota = quota
        image = self._image(spec.uid, spec.gid)
        try:
            with _engine_errors(f"starting sandbox {spec.id}"):
                self._client().containers.run(
                    image,
                    supervisor_argv(),
                    name=spec.id,
                    labels={
                        LABEL: spec.id,
                        FLEET_LABEL: self.fleet,
                        DIRECTORY_LABEL: str(spec.directory),
                        CPU_QUOTA_LABEL: str(quota),
                    },
                    detach=True,
                    runtime=self.runtime,
                    network_mode="none",
                    read_only=ROOT_READONLY,  # the runtime's flags put the root in memory (scripts/docker.sh)
                    tmpfs={"/tmp": "rw,nosuid,nodev,mode=1777"},
                    mounts=[
                        Mount(b.destination, str(b.source), type="bind", read_only=not b.writable)
                        for b in sandbox_binds(spec, self.python)
                    ],
                    user="0:0",  # the supervisor; each server runs under a uid of its own (`SUPERVISOR_CAPS`)
                    cap_drop=["ALL"],
                    cap_add=[c.removeprefix("CAP_") for c in SUPERVISOR_CAPS],
                    security_opt=["no-new-privileges"],
                    mem_limit=limits.memory_bytes,
                    memswap_limit=limits.memory_bytes,
                    pids_limit=host_pids(limits),
                    cpu_period=limits.cpu_period_us,
                    cpu_quota=start_quota,
                    ulimits=[
                        Ulimit(name="nofile", soft=OPEN_FILES, hard=OPEN_FILES),
                        Ulimit(name="nproc", soft=limits.pids, hard=limits.pids),
                    ],
                    environment=environment(self.python),
                    working_dir=INIT_CWD,
                    hostname=HOSTNAME,
                    # The servers' stderr: bounded, and copied next to the sandbox when it is destroyed.
                    log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "1"}),
                )
        except DockerError:
            self._destroy(spec.id, 0.0)  # a container created but not started
            raise

    def _destroy(self, sandbox_id: str, grace: float) -> None:
        try:
            container = self._client().containers.get(sandbox_id)
        except docker.errors.NotFound:
            return
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("Docker Engine: destroying sandbox %s: %s", sandbox_id, exc)
            raise DockerError(f"destroying sandbox {sandbox_id}: the Docker Engine failed ({type(exc).__name__})") from exc
        if grace > 0 and container.status == "running":
            # The supervisor passes SIGTERM to its servers and exits, which ends the sandbox.
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                container.stop(timeout=max(1, round(grace)))
        self._keep_log(container)
        self._remove(sandbox_id)

    def _keep_log(self, container: Any) -> None:
        """The console's tail into the sandbox's dir, where the runsc backend keeps its console log."""
        directory = Path(container.labels.get(DIRECTORY_LABEL, ""))
        if not directory.is_absolute() or not directory.is_dir():
            return
        with contextlib.suppress(docker.errors.DockerException, requests.RequestException, OSError):
            (directory / "console.log").write_bytes(container.logs(tail=200))

    def _remove(self, sandbox_id: str) -> None:
        try:
            self._client().api.remove_container(sandbox_id, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                log.warning("Docker Engine: removing sandbox %s: %s", sandbox_id, exc)
                raise DockerError(f"removing sandbox {sandbox_id}: the Docker Engine failed ({exc.status_code})") from exc
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("Docker Engine: removing sandbox %s: %s", sandbox_id, exc)
            raise DockerError(f"removing sandbox {sandbox_id}: the Docker Engine failed ({type(exc).__name__})") from exc

    def _inspect(self, sandbox_id: str) -> dict[str, Any] | None:
        with _engine_errors(f"inspecting sandbox {sandbox_id}"):
            try:
                return self._client().api.inspect_container(sandbox_id)
            except docker.errors.NotFound:
                return None

    def _containers(self) -> builtins.list[Any]:
        with _engine_errors("listing sandboxes"):
            return self._client().containers.list(
                all=True, filters={"label": [LABEL, f"{FLEET_LABEL}={self.fleet}"]}, ignore_removed=True
            )

    def _list(self) -> builtins.list[Container]:
        return [Container(id=c.name, status=_STATUSES.get(c.status, "stopped")) for c in self._containers()]

    def _settle(self, sandbox_id: str) -> None:
        # `docker update` would call `runsc update`, which runsc does not have: the cgroup is written directly.
        attrs = self._inspect(sandbox_id)
        if attrs is None:
            raise DockerError(f"no sandbox {sandbox_id}")
        quota = int(attrs["Config"]["Labels"].get(CPU_QUOTA_LABEL, 0))
        if quota <= 0:
            return
        if not attrs["State"]["Running"]:
            raise DockerError(f"sandbox {sandbox_id} does not run")
        # Also after a restore: the engine creates the cgroup again with the quota the sandbox started with.
        cgroup = _cgroup_dir(attrs["State"]["Pid"], "cpu")
        if cgroup is None:
            raise DockerError(f"no CPU cgroup for sandbox {sandbox_id} under {CGROUP_ROOT}")
        if (cgroup / "cpu.cfs_quota_us").exists():
            (cgroup / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (cgroup / "cpu.max").write_text(f"{quota} {attrs['HostConfig']['CpuPeriod'] or 100_000}")

    def cpu_quota_us(self, sandbox_id: str) -> int | None:
        """The CPU quota in force for the sandbox, from its cgroup."""
        attrs = self._inspect(sandbox_id)
        cgroup = _cgroup_dir(attrs["State"]["Pid"], "cpu") if attrs else None
        if cgroup is None:
            return None
        if (cgroup / "cpu.cfs_quota_us").exists():
            return int((cgroup / "cpu.cfs_quota_us").read_text())
        quota = (cgroup / "cpu.max").read_text().split()[0]
        return None if quota == "max" else int(quota)

    def _memory_bytes(self, sandbox_id: str) -> int | None:
        attrs = self._inspect(sandbox_id)
        if attrs is None or not attrs["State"]["Running"]:
            return None
        cgroup = _cgroup_dir(attrs["State"]["Pid"], "memory")
        if cgroup is None:
            return None
        try:
            if (cgroup / "memory.usage_in_bytes").exists():
                usage = int((cgroup / "memory.usage_in_bytes").read_text())
                inactive = _stat(cgroup / "memory.stat", "total_inactive_file")
            else:
                usage = int((cgroup / "memory.current").read_text())
                inactive = _stat(cgroup / "memory.stat", "inactive_file")
        except OSError:
            return None
        return max(usage - inactive, 0) or None

    def _checkpoint(self, sandbox_id: str, image_dir: Path) -> None:
        attrs = self._inspect(sandbox_id)
        if attrs is None or not attrs["State"]["Running"]:
            raise DockerError(f"sandbox {sandbox_id} does not run: nothing to checkpoint")
        container_id = attrs["Id"]
        saved = self._engine("GET", f"/containers/{container_id}/checkpoints") or []
        if any(c.get("Name") == CHECKPOINT for c in saved):  # from an earlier hibernation
            self._engine("DELETE", f"/containers/{container_id}/checkpoints/{CHECKPOINT}")
        self._engine(
            "POST",
            f"/containers/{container_id}/checkpoints",
            json={"CheckpointID": CHECKPOINT, "Exit": True},
            timeout=CHECKPOINT_TIMEOUT,
        )
        with _engine_errors(f"waiting for sandbox {sandbox_id} to stop after its checkpoint"):
            self._client().api.wait(container_id, timeout=COMMAND_TIMEOUT)
        image_dir.mkdir(parents=True, exist_ok=True)
        note = {"container": container_id, "checkpoint": CHECKPOINT}
        (image_dir / CHECKPOINT_NOTE).write_text(json.dumps(note) + "\n")

    def _restore(self, sandbox_id: str, image_dir: Path) -> None:
        try:
            note = json.loads((image_dir / CHECKPOINT_NOTE).read_text())
        except (OSError, ValueError) as exc:
            log.warning("sandbox %s: no checkpoint note in %s: %s", sandbox_id, image_dir, exc)
            raise DockerError(f"sandbox {sandbox_id} has no readable checkpoint ({type(exc).__name__})") from None
        attrs = self._inspect(sandbox_id)
        if attrs is None or attrs["Id"] != note["container"]:
            raise DockerError(f"the container that sandbox {sandbox_id} was saved from is gone")
        self._engine("POST", f"/containers/{attrs['Id']}/start", params={"checkpoint": note["checkpoint"]})
        # The engine would keep the image (as large as the sandbox's memory) until the container goes.
        self._engine("DELETE", f"/containers/{attrs['Id']}/checkpoints/{note['checkpoint']}")

    def _engine(self, method: str, path: str, *, timeout: float = COMMAND_TIMEOUT, **kwargs: Any) -> Any:
        """An Engine API call the SDK has no method for (checkpoints); its JSON answer, if any."""
        api = self._client().api
        url = f"{api.base_url}/v{api.api_version}{path}"
        try:
            response = api.request(method, url, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            log.warning("Docker Engine: %s %s: %s", method, path, exc)
            raise DockerError(f"the Docker Engine did not answer {method} {path.rsplit('/', 1)[-1]} ({type(exc).__name__})") from exc
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            log.warning("Docker Engine: %s %s failed (%s): %s", method, path, response.status_code, message.strip()[-4000:])
            raise DockerError(f"the Docker Engine refused {method} {path.rsplit('/', 1)[-1]} ({response.status_code})")
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.json()
        return None


@contextlib.contextmanager
def _engine_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except (docker.errors.DockerException, requests.RequestException) as exc:
        log.warning("Docker Engine: %s: %s", doing, exc)
        status = getattr(exc, "status_code", None)
        raise DockerError(f"{doing}: the Docker Engine failed ({status or type(exc).__name__})") from exc


def _reproducible_tar(root: Path) -> bytes:
    """`root` as a tar whose bytes depend only on its content, so that its hash names it."""

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        if info.isdir():
            info.mode = 0o755
        elif info.isfile():
            info.mode = 0o644
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".", filter=normalize)
    return buffer.getvalue()


def _cgroup_dir(pid: int, controller: str) -> Path | None:
    """The cgroup of `pid` for `controller` (v1), or its cgroup (v2), whatever the engine's cgroup driver."""
    if not pid:
        return None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    return None


def _stat(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def docker_backend(home: Path, python: PythonRuntime | None = None) -> DockerBackend:
    """The gateway's Docker backend for the fleet at `home`."""
    return DockerBackend(str(Path(home).resolve()), python=python)
