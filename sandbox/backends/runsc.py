"""Sandboxes as gVisor containers run directly with `runsc`, from OCI bundles.

Containers are started detached, in their own session, so they outlive the
gateway process: a restarted gateway finds them in `runsc list` and reconnects.
Every command runs with the same flags: no network at all, host Unix sockets
that may be opened (connected to) but not created, which is all the supervisor
needs to reach the gateway's socket in its channel dir, and the root under an
overlay in memory (`bundle.ROOT_OVERLAY`), so that `df /` tells nothing of the
host's disk. Which runsc, and on which platform, `sandbox.gvisor` decides.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import glob
import json
import logging
import os
import signal
from pathlib import Path

from sandbox.backends.base import Container, SandboxSpec
from sandbox.backends.freezer import CgroupFreezer
from sandbox.bundle import CPU_QUOTA_ANNOTATION, ROOT_OVERLAY, build_bundle
from sandbox.errors import SandboxUnavailable
from sandbox.gvisor import choose
from sandbox.runtime import PythonRuntime, current_python

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
EXIT_WAIT = 10.0
"""How long `destroy` waits for a killed sandbox's processes to finish exiting."""
CGROUP_ROOT = Path("/sys/fs/cgroup")
THAWING_COMMANDS = frozenset({"exec", "kill", "checkpoint", "delete", "ps", "events", "debug", "pause", "resume", "state"})
"""runsc commands that reach into a running sandbox (a frozen one would not answer them): it is thawed
first. `list` asks every sandbox: all of them are."""


class RunscError(SandboxUnavailable):
    """A runsc command failed; its message is one sentence, runsc's own output goes to the log."""


class RunscBackend:
    name = "runsc"
    keeps_memory = True

    def __init__(
        self,
        root: Path,
        *,
        runsc: str | None = None,
        platform: str | None = None,
        cgroup_parent: str = "/mcpfleet",
        start_cpus: float | None = float(os.cpu_count() or 1),
        python: PythonRuntime | None = None,
        quick_restore: bool = True,
    ):
        """`root` holds runsc's state; `cgroup_parent` is where each sandbox's cgroup goes (v1 or v2).

        A sandbox starts with `start_cpus` of CPU (None: its own limit), until `settle()`:
        importing the servers' code is most of a cold start, and it is CPU-bound.
        `python` is the runtime bound into every sandbox (default: the gateway's own).
        `runsc` and `platform` default as `sandbox.gvisor.choose` says (the newest runsc here).
        `quick_restore` (off only to measure against): a restore runs no `runsc delete` unless runsc
        keeps state for the id, and `settle` reads the bundle it knows instead of asking `runsc state`
        (each runsc command is a process start, 20-70 ms on a loaded host).
        """
        self.root = Path(root)
        self.gvisor = choose(runsc, platform)
        self.runsc = self.gvisor.runsc
        self.platform = self.gvisor.platform
        self.cgroup_parent = cgroup_parent.rstrip("/")
        self.start_cpus = start_cpus
        self.python = python or current_python()
        self.quick_restore = quick_restore
        self._bundles: dict[str, Path] = {}
        """The bundle of each sandbox this backend started or restored, by id (`settle` reads it)."""
        self.freezer = CgroupFreezer(self.cgroup_parent)
        self._frozen: set[str] = set()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _flags(self) -> list[str]:
        return ["--root", str(self.root), "--network=none", "--host-uds=open", ROOT_OVERLAY, f"--platform={self.platform}"]

    async def _run(self, *args: str, log_file: Path | None = None, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        if args and args[0] in THAWING_COMMANDS:
            for arg in args[1:]:
                self.thaw(arg)
        elif args and args[0] == "list":
            for sandbox_id in list(self._frozen):
                self.thaw(sandbox_id)
        argv = [self.runsc, *self._flags()]
        if log_file is not None:
            argv += ["--log", str(log_file)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise RunscError(f"runsc is not installed (no {self.runsc!r} on PATH)") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RunscError(f"runsc {args[0]} did not finish within {timeout:.0f}s") from None
        return proc.returncode or 0, out.decode(errors="replace").strip()

    # -- SandboxBackend -----------------------------------------------------------------

    async def start(self, spec: SandboxSpec) -> None:
        bundle = self._new_bundle(spec)
        await self._launch(spec, "run", "--detach", "--bundle", str(bundle), spec.id)
        self._bundles[spec.id] = bundle

    def _new_bundle(self, spec: SandboxSpec) -> Path:
        return build_bundle(
            spec,
            spec.directory / "bundle",
            cgroups_path=f"{self.cgroup_parent}/{spec.id}",
            start_cpus=self.start_cpus,
            runtime=self.python,
        )

    async def _launch(self, spec: SandboxSpec, *args: str) -> None:
        """`runsc run` or `restore`, whose sandbox keeps the console log as its stdout and stderr."""
        console = os.open(spec.directory / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.runsc,
                *self._flags(),
                "--log",
                str(spec.directory / "runsc.log"),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                start_new_session=True,  # not in the gateway's process group: a ^C there must not reach it
            )
        except FileNotFoundError:
            raise RunscError(f"runsc is not installed (no {self.runsc!r} on PATH)") from None
        finally:
            os.close(console)
        try:
            code = await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            code = -1
        if code != 0:
            # Its output (gVisor's, and the servers' stderr) stays in this log and the sandbox's dir.
            log.warning("runsc %s of sandbox %s failed (%s): %s", args[0], spec.id, code, _tail(spec.directory / "console.log"))
            await self.destroy(spec.id)
            raise RunscError(f"gVisor could not {args[0]} the sandbox (runsc exited with {code})")
        self._oom_kill_sentry_first(spec.id)

    def _oom_kill_sentry_first(self, sandbox_id: str) -> None:
        """A sandbox over its memory limit must die whole. The kernel's OOM killer takes the largest
        process in the cgroup, which on systrap is a stub (the application's address space, in the
        sentry's shared memory), and runsc 2024-07's sentry then waits on it forever: the call hangs
        and the sandbox stays. The sentry goes first instead (its stubs die with it); the stubs that
        exist already were forked before this and keep their score, as do those they fork later."""
        for pid, argv in runsc_processes(self.root):
            if argv[0] == "runsc-sandbox" and any(sandbox_id in arg for arg in argv):
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/oom_score_adj").write_text("1000")

    async def destroy(self, sandbox_id: str, *, grace: float = 0.0) -> None:
        await self._destroy(sandbox_id, grace, set(self.host_processes(sandbox_id)))

    async def _destroy(self, sandbox_id: str, grace: float, processes: set[int]) -> None:
        """`processes`: the sandbox's, found while their command lines still named it (an exiting one's is empty)."""
        if grace > 0 and (await self._run("kill", sandbox_id, "TERM"))[0] == 0:
            # The supervisor passes SIGTERM to its servers and exits, which ends the sandbox.
            deadline = asyncio.get_running_loop().time() + grace
            while await self.is_alive(sandbox_id) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
        await self._run("kill", sandbox_id, "KILL")
        code, out = await self._run("delete", "--force", sandbox_id)
        if code != 0 and "does not exist" not in out:
            log.warning("runsc delete %s: %s", sandbox_id, out)
        for pid in self.host_processes(sandbox_id):
            processes.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Killed is not gone: until its last thread has exited, a process keeps its mount namespace,
        # and with it the workspace's loop device, which the sandbox's next start or resume must mount.
        deadline = asyncio.get_running_loop().time() + EXIT_WAIT
        while any(map(_is_live_process, processes)) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self._remove_cgroups(sandbox_id)
        self._bundles.pop(sandbox_id, None)
        self._frozen.discard(sandbox_id)

    async def settle(self, sandbox_id: str) -> None:
        bundle = self._bundles.get(sandbox_id) if self.quick_restore else None
        if bundle is None:  # not started or restored by this backend (adopted): runsc knows where it is
            state = await self._state(sandbox_id)
            if state is None:
                raise RunscError(f"no sandbox {sandbox_id}")
            bundle = Path(state["bundle"])
        config = json.loads((bundle / "config.json").read_text())
        quota = int(config.get("annotations", {}).get(CPU_QUOTA_ANNOTATION, 0))
        cpu = config["linux"]["resources"]["cpu"]
        if quota <= 0 or quota == cpu["quota"]:
            return
        relative = config["linux"]["cgroupsPath"].lstrip("/")
        v1 = CGROUP_ROOT / "cpu" / relative / "cpu.cfs_quota_us"
        v2 = CGROUP_ROOT / relative / "cpu.max"
        if v1.exists():
            v1.write_text(str(quota))
        elif v2.exists():
            v2.write_text(f"{quota} {cpu['period']}")
        else:
            raise RunscError(f"no CPU cgroup for sandbox {sandbox_id} under {CGROUP_ROOT}")

    def cpu_quota_us(self, sandbox_id: str) -> int | None:
        """The CPU quota in force for the sandbox, from its cgroup."""
        relative = f"{self.cgroup_parent}/{sandbox_id}".lstrip("/")
        v1 = CGROUP_ROOT / "cpu" / relative / "cpu.cfs_quota_us"
        v2 = CGROUP_ROOT / relative / "cpu.max"
        if v1.exists():
            return int(v1.read_text())
        if v2.exists():
            quota = v2.read_text().split()[0]
            return None if quota == "max" else int(quota)
        return None

    async def is_alive(self, sandbox_id: str) -> bool:
        state = await self._state(sandbox_id)
        if state is None or state.get("status") != "running":
            return False
        # runsc 2024-07 asks the kernel whether the sandbox's pid exists, and a killed sandbox stays
        # a zombie until the host's init reaps it (here that can take seconds): it is dead already.
        pid = state.get("pid")
        return not isinstance(pid, int) or pid <= 0 or _is_live_process(pid)

    async def _state(self, sandbox_id: str) -> dict | None:
        code, out = await self._run("state", sandbox_id)
        if code != 0:
            return None
        try:
            return json.loads(out)
        except ValueError:
            return None

    async def list(self) -> list[Container]:
        code, out = await self._run("list", "--format=json")
        if code != 0:
            log.warning("runsc list failed (%s): %s", code, out[-4000:])
            raise RunscError(f"gVisor could not list the sandboxes (runsc exited with {code})")
        return [Container(id=c["id"], status=c["status"]) for c in json.loads(out) or []]

    async def memory_bytes(self, sandbox_id: str) -> int | None:
        """Resident memory of the sandbox's runsc processes (sentry, gofer, and on ptrace the
        stub processes that hold the address spaces inside); None if none runs."""
        pids = self.host_processes(sandbox_id)
        pids += [child for pid in pids for child in descendant_pids(pid)]
        total = sum(_rss_bytes(pid) for pid in set(pids))
        return total or None

    async def checkpoint(self, sandbox_id: str, image_dir: Path) -> None:
        """Save the sandbox's whole state (memory included) to `image_dir`; the sandbox stops.

        gVisor refuses (and the sandbox dies) while it holds a host socket: detach
        the supervisor's channel first (`SupervisorClient.detach()`).
        """
        image_dir.mkdir(parents=True, exist_ok=True)
        processes = set(self.host_processes(sandbox_id))
        code, out = await self._run(
            "checkpoint", *self.gvisor.checkpoint_flags(), "--image-path", str(image_dir), sandbox_id, timeout=300
        )
        if code != 0:
            # gVisor explains with a stack trace: for the log, not for the sandbox's row or the user.
            log.warning("runsc checkpoint of sandbox %s failed (%s): %s", sandbox_id, code, out[-4000:])
            raise RunscError(f"gVisor could not checkpoint the sandbox (runsc exited with {code})")
        # The saved sandbox is stopped; `restore` builds it anew from the bundle and the image,
        # so nothing of it needs to stay in runsc's state or in the cgroups meanwhile.
        await self._destroy(sandbox_id, 0.0, processes)

    async def clone(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Run a new sandbox from another one's checkpoint (a template's, `sandbox.templates`): a bundle
        of its own, as `start` would write it, so its mounts (workspace, tools, channel) are its own."""
        bundle = self._new_bundle(spec)
        await self._launch(spec, "restore", "--detach", "--bundle", str(bundle), "--image-path", str(image_dir), spec.id)
        self._bundles[spec.id] = bundle

    async def restore(self, spec: SandboxSpec, image_dir: Path) -> None:
        """Run a checkpointed sandbox again, from its bundle and `image_dir`, under the same id."""
        if not self.quick_restore or self._has_state(spec.id):
            await self._run("delete", "--force", spec.id)  # what a gateway that died left of it
        await self._launch(
            spec,
            "restore",
            "--detach",
            "--bundle",
            str(spec.directory / "bundle"),
            "--image-path",
            str(image_dir),
            spec.id,
        )
        self._bundles[spec.id] = spec.directory / "bundle"

    def _has_state(self, sandbox_id: str) -> bool:
        """Whether runsc keeps state for the id (`<container>_sandbox:<sandbox>.state` in its root)."""
        return any(self.root.glob(f"{glob.escape(sandbox_id)}_sandbox:*"))

    def stray_processes(self, keep: set[str]) -> builtins.list[int]:
        """runsc processes under our root that belong to no sandbox in `keep`."""
        strays = []
        for pid, argv in runsc_processes(self.root):
            if not any(sandbox_id in arg for arg in argv for sandbox_id in keep):
                strays.append(pid)
        return strays

    def kill_strays(self, keep: set[str]) -> int:
        strays = self.stray_processes(keep)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(strays)

    def host_processes(self, sandbox_id: str) -> builtins.list[int]:
        """The host pids of the sandbox's runsc processes (its sentry and gofer, and runsc commands on it)."""
        return [pid for pid, argv in runsc_processes(self.root) if any(sandbox_id in arg for arg in argv)]

    # -- freezing an idle sandbox (sandbox.backends.freezer says why) -----------------------------

    async def freeze(self, sandbox_id: str) -> bool:
        """Stop the sandbox's processes in place; True if they are stopped now. Anything sent to it
        must `thaw` it first (its client does, before every message: `SupervisorClient.wake`)."""
        if sandbox_id in self._frozen:
            return True
        # Marked before the freezer is written: a message sent while the freeze settles thaws it
        # (`thaw` sees the mark), and the freeze then gives up instead of stopping a sandbox with a call.
        self._frozen.add(sandbox_id)
        if not await self.freezer.freeze(sandbox_id, lambda: sandbox_id in self._frozen):
            self.thaw(sandbox_id)
            return False
        return True

    def thaw(self, sandbox_id: str) -> None:
        """Let a frozen sandbox go on; nothing to do for one that is not frozen (the usual case: a set lookup)."""
        if sandbox_id in self._frozen:
            self._frozen.discard(sandbox_id)
            self.freezer.thaw(sandbox_id)

    def is_frozen(self, sandbox_id: str) -> bool:
        return sandbox_id in self._frozen

    def thaw_all(self) -> builtins.list[str]:
        """Thaw every sandbox of this backend's cgroup parent, whoever froze it: a gateway starting
        after one that died (it froze them, and nothing of it knows now) must be able to ask them."""
        self._frozen.clear()
        return self.freezer.thaw_all()

    def cpu_seconds(self, sandbox_id: str) -> float | None:
        """CPU time the sandbox has used (its cgroup's count), None if unknown."""
        return self.freezer.cpu_seconds(sandbox_id)

    async def run_inside(self, sandbox_id: str, command: str, user: tuple[int, int] | None = None) -> tuple[int, str]:
        """`/bin/sh -c command` in the running sandbox, as `user` (uid, gid) or its root: the exit code and
        what it printed (stdout and stderr together). For an operator looking in, and for checks."""
        as_user = ["--user", f"{user[0]}:{user[1]}"] if user is not None else []
        return await self._run("exec", *as_user, sandbox_id, "/bin/sh", "-c", command)

    def _remove_cgroups(self, sandbox_id: str) -> None:
        relative = f"{self.cgroup_parent}/{sandbox_id}".lstrip("/")
        for controller in [CGROUP_ROOT, *CGROUP_ROOT.glob("*")] if CGROUP_ROOT.is_dir() else []:
            path = controller / relative
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()


def runsc_processes(root: Path) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live runsc processes (gofer, sandbox, commands) that use `root`."""
    marker = f"--root={root}"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not _is_live_process(int(entry.name)):
            continue
        # The commands run as the binary's path (/opt/.../runsc), its sandbox and gofer as `runsc-sandbox`.
        if argv and Path(argv[0]).name.startswith("runsc") and (marker in argv or any(a == str(root) for a in argv)):
            found.append((int(entry.name), argv))
    return found


def _is_live_process(pid: int) -> bool:
    """Alive, or still exiting: a zombie whose other threads still run (a Go program's main thread
    exits first) holds its namespaces and files; one that is only waiting to be reaped holds nothing."""
    try:
        if _process_state(Path(f"/proc/{pid}/stat").read_text()) != "Z":
            return True
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    threads = next((line.split()[1] for line in status.splitlines() if line.startswith("Threads:")), "1")
    return int(threads) > 1


def _process_state(stat: str) -> str:
    """The state letter of a /proc/<pid>/stat line (after the command, which may hold spaces and parens)."""
    return stat.rsplit(")", 1)[-1].split()[0]


def descendant_pids(pid: int) -> list[int]:
    """Descendants of `pid` (the ptrace platform's stubs are children of the sentry)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            kids = [int(k) for t in tasks for k in (t / "children").read_text().split()]
        except OSError:
            continue
        found += kids
        queue += kids
    return found


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(no output)"
    except OSError:
        return "(no output)"
