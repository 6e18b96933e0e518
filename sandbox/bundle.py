"""The OCI bundle of a sandbox: an empty read-only root with the host's runtime bound in.

Inside, a sandbox sees the host's system dirs and a Python (`sandbox.runtime`)
read-only, the product's own packages (and nothing else of the project: its dir
also holds the fleet home with every user's workspace) under /opt/mcpfleet, its
user's workspace read-write at /workspace, and its channel dir at /run/mcpfleet.

`df` inside shows gVisor's memory at / (`ROOT_OVERLAY`) and the workspace's own quota at
/workspace; the binds of the host's dirs still show the host's disk, since runsc answers
statfs on a bind with the host's answer for its source and overlays only writable binds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox import wire
from sandbox.backends.base import SandboxSpec
from sandbox.limits import Limits
from sandbox.runtime import PythonRuntime, current_python
from sandbox.supervisor.config import SUPERVISOR_FLAGS

log = logging.getLogger(__name__)

PRODUCT_PACKAGES = ("sandbox", "mcp_servers", "mcpfleet_sdk")
"""Packages of the product importable inside: the supervisor, the built-in servers, and the SDK tool servers import."""

OPT = "/opt/mcpfleet"
LIB = f"{OPT}/lib"
BIN = f"{OPT}/bin"
SITE_PACKAGES = f"{OPT}/site-packages"
NODE = f"{OPT}/node"
"""The Node runtime of npm servers (`registry.onboard_npm`): scripts/setup.sh puts a pinned Node 22 there
on the host, and every sandbox sees the same dir read-only at the same path (its bin/ is on PATH)."""
WORKSPACE = "/workspace"
TOOLS = "/opt/tools"
"""Published servers' installs, those of the sandbox's own servers only (`registry.artifacts`)."""
TOOLS_DIR = "tools"
"""Its host side, in the sandbox's dir."""
HOSTNAME = "sandbox"
USER_NAME = "mcp"
SERVER_UIDS = 2000
"""The first uid of the servers, one each (`sandbox.supervisor.uids`); all in the workspace's group."""
NAMED_SERVER_UIDS = 64
"""How many of them /etc/passwd names (`server-N`), for tools that ask who they are."""
SUPERVISOR_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_SYS_PTRACE")
"""The supervisor runs as root inside (gVisor's, not the host's) with these only: to start each server
under its own uid and group (SETUID, SETGID), stop them (KILL), make their private dirs and share the
workspace (CHOWN, FOWNER), read its channel dir and the workspace, owned by the sandbox's uid
(DAC_OVERRIDE), and tell which server holds a connection to the egress proxy (SYS_PTRACE, for
/proc/PID/fd). A server started under its own uid keeps none of them (setuid from root clears them)."""

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives")
"""/etc/alternatives: Debian's names for programs (awk, editor, pager) are symlinks through it."""
SYSTEM_FILES = ("/etc/ld.so.cache",)

BUSYBOX_APPLETS = ("ls", "stat")
"""The host's tools that fail inside, replaced by busybox's (first on PATH): coreutils' `ls` and `stat`
call statx with AT_NO_AUTOMOUNT, which this runsc refuses with EINVAL. The rest of coreutils uses
fstatat and works (`dir`, `vdir` and psmisc's `fuser` fail too, and busybox has no such applets)."""
BUSYBOX_PATH = "/usr/bin:/bin"

ROOT_OVERLAY = "--overlay2=root:memory"
"""runsc's flag that puts the root under an overlay in the sandbox's memory, so that statfs (`df /`)
answers with gVisor's own tmpfs instead of the host disk that holds the bundle. Every backend runs
runsc with it (the Docker backend through the runtime's flags in scripts/docker.sh)."""
ROOT_READONLY = False
"""runsc leaves a read-only root without its overlay (and then `df /` shows the host's disk). The root
stays read-only all the same for the servers and what they run: all of it belongs to root, and they run
as other users without capabilities (EACCES instead of EROFS); only the supervisor runs as root."""

_RO = ["rbind", "ro", "nosuid", "nodev"]
_RW = ["rbind", "rw", "nosuid", "nodev"]


def product_packages() -> dict[str, Path]:
    packages = {}
    for name in PRODUCT_PACKAGES:
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise RuntimeError(f"the {name!r} package is not importable")
        packages[name] = Path(next(iter(found.submodule_search_locations))).resolve()
    return packages


INIT = "/usr/bin/tini-static"
"""PID 1 inside: Debian's tini (scripts/setup.sh installs it; the sandbox sees the host's /usr). It reaps
orphans, passes signals on to the supervisor, its only child, and exits with it, which ends the sandbox.
Its RSS inside is about 2 MiB; a forked Python for the same job had 30 MiB, much of it shared with the
supervisor, and a fresh sandbox's PSS fell by 11-15 MiB and its checkpoint by 13 MiB without it
(bench/fresh_memory.py, gVisor 2024-07 systrap). Statically linked: it maps none of the host's libraries."""


@functools.cache
def init_argv() -> tuple[str, ...]:
    """tini before the supervisor where the host has it; without it the supervisor finds itself PID 1
    and forks an init of its own (`sandbox.supervisor.init`). Looked up once: the warning is said once."""
    if Path(INIT).is_file():
        return (INIT, "--")
    log.warning("%s is missing (scripts/setup.sh installs it): sandboxes fork a Python as their PID 1", INIT)
    return ()


@functools.cache
def compile_packages(python: Path, packages: tuple[Path, ...]) -> None:
    """Byte-compile the product's packages on the host, once per process, by the sandbox's own Python
    (its version names the .pyc files). They are bound read-only, so a sandbox cannot write the .pyc
    of a module it imports: without them, each supervisor compiled its modules from source at every
    start, which left a fresh sandbox holding about 9 MiB more (PSS, bench/fresh_memory.py).
    Where the packages cannot be written (an install owned by root, which pip compiled), nothing changes."""
    try:
        done = subprocess.run(
            [str(python), "-I", "-m", "compileall", "-q", "-o", "0", "-o", "2", *map(str, packages)], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("the product's packages were not byte-compiled: %s", exc)
        return
    if done.returncode != 0:
        log.info("the product's packages were not all byte-compiled: %s", (done.stdout + done.stderr).strip()[-500:])


def supervisor_argv() -> list[str]:
    python = [f"{BIN}/python", *SUPERVISOR_FLAGS, "-m", "sandbox.supervisor", f"{wire.CHANNEL_DIR}/{wire.CONFIG_NAME}"]
    return [*init_argv(), *python]


INIT_CWD = "/"
"""The supervisor's working directory: read-only, unlike /workspace (its servers run in the workspace)."""


OPEN_FILES = 4096


def host_pids(limits: Limits) -> int:
    """The cgroup's pids limit: a backstop well behind RLIMIT_NPROC (`limits.pids`, enforced by gVisor
    inside the sandbox: a fork bomb gets EAGAIN, nothing dies), since reaching it can kill the whole sandbox.

    It counts host tasks: gVisor's own threads plus, on the ptrace platform, about 8.5 per task
    inside at rest and up to ~17 while they are being created (measured).
    """
    return 512 + 32 * limits.pids


CPU_QUOTA_ANNOTATION = "dev.mcpfleet.cpu-quota-us"
"""The sandbox's own CPU quota, when it starts with more (see `start_cpus`)."""


@dataclass(frozen=True)
class Bind:
    """A host path the sandbox sees at `destination`."""

    source: Path
    destination: str
    writable: bool = False


def system_binds(runtime: PythonRuntime) -> list[Bind]:
    """What every sandbox sees of the host, read-only: system dirs, the Python, the product's packages."""
    binds: list[Bind] = []
    for name in SYSTEM_DIRS:
        host = Path(name)
        if host.is_dir() and not host.is_symlink():  # merged /usr: /bin -> usr/bin is in the root itself
            binds.append(Bind(host, name))
    for name in SYSTEM_FILES:
        if Path(name).is_file():
            binds.append(Bind(Path(name), name))
    if not any(runtime.prefix.is_relative_to(b.source) for b in binds):
        binds.append(Bind(runtime.prefix, str(runtime.prefix)))
    for i, path in enumerate(runtime.site_packages):
        binds.append(Bind(path, _site_inside(i)))
    packages = product_packages()
    compile_packages(runtime.executable, tuple(packages.values()))
    for name, path in packages.items():
        binds.append(Bind(path, f"{LIB}/{name}"))
    if Path(NODE, "bin", "node").exists():  # a host without it runs no npm server (onboarding refuses them)
        binds.append(Bind(Path(NODE), NODE))
    return binds


def sandbox_binds(spec: SandboxSpec, runtime: PythonRuntime) -> list[Bind]:
    """Every bind of one sandbox, in mount order: the system's, then its user's workspace and its channel."""
    # A sandbox started without published servers (or by an older gateway) has no tools dir yet.
    (spec.directory / TOOLS_DIR).mkdir(mode=0o755, exist_ok=True)
    return [
        *system_binds(runtime),
        Bind(spec.workspace, WORKSPACE, writable=True),
        Bind(spec.channel, wire.CHANNEL_DIR, writable=True),
        Bind(spec.directory / TOOLS_DIR, TOOLS),
    ]


def write_root(rootfs: Path, runtime: PythonRuntime, uid: int, gid: int) -> None:
    """The sandbox's own root: /etc, /opt/mcpfleet/bin, merged-/usr symlinks and a mountpoint per bind.

    The same for every sandbox of a runtime and a user id, whatever its workspace.
    """
    rootfs.mkdir(parents=True, exist_ok=True)
    for name in SYSTEM_DIRS:
        host = Path(name)
        if host.is_symlink():
            (rootfs / name.lstrip("/")).symlink_to(os.readlink(host))
    mountpoints = [(b.destination, b.source.is_dir()) for b in system_binds(runtime)]
    for destination, is_dir in [*mountpoints, (WORKSPACE, True), (wire.CHANNEL_DIR, True), (TOOLS, True)]:
        target = rootfs / destination.lstrip("/")
        if is_dir:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()

    (rootfs / BIN.lstrip("/")).mkdir(parents=True)
    for alias in ("python", "python3"):
        (rootfs / BIN.lstrip("/") / alias).symlink_to(runtime.executable)
    if (busybox := shutil.which("busybox", path=BUSYBOX_PATH)) is not None:
        for applet in BUSYBOX_APPLETS:  # busybox runs the applet that argv[0] names
            (rootfs / BIN.lstrip("/") / applet).symlink_to(busybox)
    else:
        log.warning("busybox is not installed: `ls -l` and `stat` fail in sandboxes (scripts/setup.sh installs it)")
    _write_etc(rootfs / "etc", uid, gid)


def build_bundle(
    spec: SandboxSpec,
    bundle: Path,
    *,
    cgroups_path: str | None = None,
    start_cpus: float | None = None,
    runtime: PythonRuntime | None = None,
) -> Path:
    """Write `bundle/config.json` and `bundle/rootfs`; returns `bundle`.

    With `start_cpus`, the sandbox starts with that CPU quota; its own quota is
    recorded as an annotation, for the backend to apply once the servers are up.
    """
    runtime = runtime or current_python()
    rootfs = bundle / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    write_root(rootfs, runtime, spec.uid, spec.gid)
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
    ]
    for b in sandbox_binds(spec, runtime):
        options = _RW if b.writable else _RO
        mounts.append({"destination": b.destination, "type": "bind", "source": str(b.source), "options": options})

    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},  # the servers run under uids of their own (`SUPERVISOR_CAPS`)
            "args": supervisor_argv(),
            "env": [f"{k}={v}" for k, v in environment(runtime).items()],
            "cwd": INIT_CWD,
            "capabilities": {
                **{k: list(SUPERVISOR_CAPS) for k in ("bounding", "effective", "permitted")},
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": OPEN_FILES, "soft": OPEN_FILES},
                {"type": "RLIMIT_NPROC", "hard": spec.limits.pids, "soft": spec.limits.pids},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": ROOT_READONLY},
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "resources": {
                "memory": {"limit": spec.limits.memory_bytes, "swap": spec.limits.memory_bytes},
                "pids": {"limit": host_pids(spec.limits)},
                "cpu": {"quota": spec.limits.cpu_quota_us, "period": spec.limits.cpu_period_us},
            },
        },
        "annotations": {CPU_QUOTA_ANNOTATION: str(spec.limits.cpu_quota_us)},
    }
    if start_cpus is not None and start_cpus > spec.limits.cpus:
        config["linux"]["resources"]["cpu"]["quota"] = int(start_cpus * spec.limits.cpu_period_us)
    if cgroups_path:
        config["linux"]["cgroupsPath"] = cgroups_path
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def environment(runtime: PythonRuntime) -> dict[str, str]:
    """The supervisor's environment (its servers inherit it)."""
    site_inside = [_site_inside(i) for i in range(len(runtime.site_packages))]
    return {
        "PATH": f"{BIN}:{NODE}/bin:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": ":".join([LIB, *site_inside]),
        "PYTHONDONTWRITEBYTECODE": "1",  # everything but /workspace and /tmp is read-only
        "PYTHONUNBUFFERED": "1",
        "HOME": WORKSPACE,
        "USER": USER_NAME,
        "LOGNAME": USER_NAME,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
    }


def _site_inside(i: int) -> str:
    return SITE_PACKAGES if i == 0 else f"{SITE_PACKAGES}-{i}"


def _write_etc(etc: Path, uid: int, gid: int) -> None:
    etc.mkdir(parents=True, exist_ok=True)
    users = [("root", 0, 0, "/root")]
    if uid != 0:
        users.append((USER_NAME, uid, gid, WORKSPACE))
    users += [(f"server-{i}", SERVER_UIDS + i, gid, WORKSPACE) for i in range(NAMED_SERVER_UIDS)]
    users.append(("nobody", 65534, 65534, "/nonexistent"))
    (etc / "passwd").write_text("".join(f"{n}:x:{u}:{g}:{n}:{h}:/bin/sh\n" for n, u, g, h in users))
    groups = {0: "root", gid: USER_NAME if gid != 0 else "root", 65534: "nogroup"}
    (etc / "group").write_text("".join(f"{name}:x:{g}:\n" for g, name in groups.items()))
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{HOSTNAME}\n")
    (etc / "hostname").write_text(f"{HOSTNAME}\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    (etc / "resolv.conf").write_text("")  # no network, no DNS
