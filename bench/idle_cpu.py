"""What an idle sandbox costs in CPU, and how much of it is gVisor's own: N real sandboxes (the
built-in servers, started through the SandboxManager, one `tools/call` each, then left alone) beside
bare runsc sandboxes that run only `sleep infinity` under the same runsc and flags (the floor), and
the same bare sandbox on the ptrace platform, all measured in the same windows.

CPU is utime+stime from /proc/<pid>/stat of every host process of a sandbox (the runsc sandbox
process with the sentry, the gofer, the systrap stubs), over a fixed window, as a percentage of one
core. Windows: with the gateway's channel attached (as the fleet keeps an idle sandbox), then
with the gateway's end of every channel closed (the supervisor alone; it retries connecting on its
own backoff). The sentry's context switches per second (all its threads, voluntary and not) say how
often it wakes.

Measured on runsc 0.0~20240729 with systrap (this machine, 2 cores): an idle sandbox costs the same
as a bare `sleep infinity` sandbox, about 2.5 % of a core, nearly all in the runsc sandbox process,
which wakes about 3,000 times a second with nothing to do: systrap's fast-path monitor sleeps 400 µs
in a loop whatever the sandbox does (gVisor fixed it upstream in 2026-06, "systrap: park the fast
path monitor when the sandbox is idle", google/gvisor#13470). On ptrace the same bare sandbox costs
nothing measurable. The supervisor and servers add nothing measurable on top of the floor.

Between the two, a window with the fleet sandboxes frozen by the fleet's own sweep
(`SandboxManager.freeze_idle`, as `MCPFLEET_IDLE_FREEZE_S` does it): they then cost nothing and keep
their memory, and each is then called through its channel, which thaws it, and must answer a
`tools/call` (--no-freeze skips it).

    .venv/bin/python bench/idle_cpu.py [--sandboxes 5] [--bare 2] [--window 30] [--no-ptrace] [--keep]

Everything lives in a temporary home under /tmp with its own runsc roots, cgroup parent and embedded
PostgreSQL, and is removed at the end, on error too. A sandbox that fails to start stops the bench.
p99 is nearest-rank: with fewer than 100 samples it is the highest one.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fresh_memory import runsc_role, sandbox_pids  # beside this script
from sandbox_lifecycle import first_result, tear_down  # beside this script

from core.accounts import add_user
from core.db import migrate, open_pool, start_embedded
from sandbox.backends.runsc import RunscBackend, descendant_pids, runsc_processes
from sandbox.factory import sandbox_python
from sandbox.manager import Lifecycle, Sandbox, SandboxManager
from sandbox.servers import BUILTIN_SERVERS

TENANT = "bench"
TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_S = 5.0
"""After the last start and after closing the channels, before a window: the start's own work ends."""


@dataclass
class Group:
    """Sandboxes measured together: their ids and how to find their host processes."""

    name: str
    pids_of: dict[str, set[int]] = field(default_factory=dict)
    percent: list[float] = field(default_factory=list)
    """CPU of one core per sandbox over the window, in %."""
    by_role: dict[str, list[float]] = field(default_factory=dict)
    wakeups: list[float] = field(default_factory=list)
    """Context switches per second of each sandbox's runsc sandbox process (sentry)."""


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # gone: counted as nothing from here on
    return (int(fields[11]) + int(fields[12])) / TICKS


def context_switches(pid: int) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


def is_sentry(pid: int) -> bool:
    return runsc_role(pid).startswith("runsc sandbox")


def short_role(pid: int) -> str:
    return runsc_role(pid).split(" (")[0]


async def measure(groups: list[Group], window: float) -> None:
    """One window over every group at once (the same load for all), per sandbox."""
    before = {pid: cpu_seconds(pid) for g in groups for pids in g.pids_of.values() for pid in pids}
    switches = {pid: context_switches(pid) for g in groups for pids in g.pids_of.values() for pid in pids if is_sentry(pid)}
    roles = {pid: short_role(pid) for pid in before}
    started = time.monotonic()
    await asyncio.sleep(window)
    elapsed = time.monotonic() - started
    for group in groups:
        group.percent, group.by_role, group.wakeups = [], {}, []
        for pids in group.pids_of.values():
            parts: dict[str, float] = {}
            for pid in pids:
                parts[roles[pid]] = parts.get(roles[pid], 0.0) + 100 * (cpu_seconds(pid) - before[pid]) / elapsed
                if pid in switches:
                    group.wakeups.append((context_switches(pid) - switches[pid]) / elapsed)
            group.percent.append(sum(parts.values()))
            for role, value in parts.items():
                group.by_role.setdefault(role, []).append(value)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(0.99 * len(ordered) + 0.5) - 1)] if ordered else float("nan")


def report(title: str, groups: list[Group], baseline: Group) -> None:
    floor = statistics.median(baseline.percent)
    print(f"\n### {title}\n")
    print("| sandboxes | n | CPU median % of a core | p99 % | ratio to the floor (median) | sentry wakeups/s (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for g in groups:
        median = statistics.median(g.percent)
        ratio = f"{median / floor:.2f}x" if floor > 0 else "n/a (floor 0)"
        wakeups = f"{statistics.median(g.wakeups):.0f}" if g.wakeups else "-"
        print(f"| {g.name} | {len(g.percent)} | {median:.2f} | {p99(g.percent):.2f} | {ratio} | {wakeups} |")
    print("\nwhere it goes (median % of a core per sandbox, by host process):\n")
    for g in groups:
        parts = ", ".join(f"{role} {statistics.median(v):.2f}" for role, v in sorted(g.by_role.items()))
        print(f"- {g.name}: {parts}")


# -- bare sandboxes: the floor ------------------------------------------------------------------


def bare_bundle(directory: Path, runsc: str) -> Path:
    """An OCI bundle running `sleep infinity` on the host's root, read-only (nothing of ours inside)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([runsc, "spec", "--bundle", str(directory), "--", "/bin/sleep", "infinity"], check=True, capture_output=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["root"] = {"path": "/", "readonly": True}
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    return directory


def bare_flags(backend: RunscBackend, root: Path, platform: str) -> list[str]:
    """The fleet's own runsc flags, with this floor's root and platform."""
    flags = backend._flags()
    flags[flags.index("--root") + 1] = str(root)
    return [f"--platform={platform}" if f.startswith("--platform=") else f for f in flags]


def start_bare(backend: RunscBackend, root: Path, platform: str, bundle: Path, sandbox_id: str) -> set[int]:
    argv = [backend.runsc, *bare_flags(backend, root, platform), "run", "--detach", "--bundle", str(bundle), sandbox_id]
    log = root.parent / f"{sandbox_id}.log"
    with log.open("ab") as out:  # not a pipe: the detached sandbox keeps it open, and a pipe would never end
        code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60, start_new_session=True).returncode
    if code != 0:
        raise RuntimeError(f"the bare {platform} sandbox {sandbox_id} did not start: {log.read_text(errors='replace').strip()[-400:]}")
    pids = [pid for pid, argv in runsc_processes(root) if any(sandbox_id in arg for arg in argv)]
    if not pids:
        raise RuntimeError(f"the bare {platform} sandbox {sandbox_id} started but has no runsc process")
    return set(pids + [child for pid in pids for child in descendant_pids(pid)])


def stop_bare(backend: RunscBackend, root: Path, platform: str, sandbox_id: str) -> None:
    flags = bare_flags(backend, root, platform)
    for command in (["kill", sandbox_id, "KILL"], ["delete", "--force", sandbox_id]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([backend.runsc, *flags, *command], capture_output=True, timeout=60)


# -- the lever: the fleet freezes idle sandboxes (sandbox.freezing) ---------------------------------


async def frozen_window(manager: SandboxManager, backend: RunscBackend, sandboxes: list[Sandbox], groups: list[Group], window: float) -> None:
    """The fleet sandboxes frozen by the fleet's own sweep (idle by calls and by CPU), measured, then
    each called through its channel, which thaws it: what an idle sandbox costs as the fleet keeps it."""
    wanted = {s.id for s in sandboxes}
    frozen: set[str] = set()
    deadline = time.monotonic() + 60
    while frozen != wanted:
        if time.monotonic() > deadline:
            if not frozen:
                print("\n(no sandbox could be frozen here, no cgroup freezer? the frozen window is skipped)")
                return
            raise RuntimeError(f"not frozen within 60 s: {sorted(wanted - frozen)}")
        frozen |= set(await manager.freeze_idle())
        await asyncio.sleep(1.0)
    await measure(groups, window)
    report("fleet sandboxes frozen by the fleet (MCPFLEET_IDLE_FREEZE_S; the bare ones as before)", groups, groups[1])
    for sandbox in sandboxes:  # the call thaws it on its way in; a server answers
        started = time.perf_counter()
        await first_result(sandbox)
        if backend.is_frozen(sandbox.id):
            raise RuntimeError(f"{sandbox.id} answered but is still frozen")
        print(f"{sandbox.id}: thawed and answered a tools/call in {(time.perf_counter() - started) * 1000:.1f} ms")


# -- the run ---------------------------------------------------------------------------------------


async def start_sandboxes(manager: SandboxManager, count: int) -> list[Sandbox]:
    sandboxes = []
    for i in range(count):
        async with manager.pool.connection() as conn:
            user = await add_user(conn, f"idle{i}", tenant=TENANT)
        sandbox = await manager.ensure(user.user_id, TENANT, f"idle{i}")
        await first_result(sandbox)  # the servers' first use done, as a user's sandbox is after a call
        sandboxes.append(sandbox)
        print(f"sandbox {i + 1}/{count} up: {sandbox.id}")
    return sandboxes


async def bench(home: Path, url: str, args: argparse.Namespace) -> None:
    pool = await open_pool(url)
    cgroup_parent = f"/mcpfleet-idle-{os.getpid()}"
    backend = RunscBackend(home / "runsc", cgroup_parent=cgroup_parent, python=sandbox_python())
    print(f"runsc {backend.runsc} (gVisor {backend.gvisor.release}), platform {backend.platform}; flags {' '.join(backend._flags()[2:])}")
    lifecycle = Lifecycle(warm_pool_size=0, max_running=max(50, args.sandboxes + 2), housekeeping_interval_s=3600.0,
                          idle_freeze_s=1.0 if args.freeze else 0.0)  # the bench sweeps itself
    manager = SandboxManager(home, pool, backend, list(BUILTIN_SERVERS), lifecycle=lifecycle)
    floors = [(backend.platform, home / "bare")] + ([("ptrace", home / "bare-p")] if args.ptrace and backend.platform != "ptrace" else [])
    bundle = bare_bundle(home / "bare-bundle", backend.runsc)
    bare: list[tuple[str, Path, str]] = []
    try:
        await manager.start()
        full = Group(f"fleet sandbox ({backend.platform}, built-in servers)")
        sandboxes = await start_sandboxes(manager, args.sandboxes)
        full.pids_of = {s.id: sandbox_pids(backend, s.id) for s in sandboxes}
        groups = [full]
        for platform, root in floors:
            group = Group(f"bare `sleep infinity` ({platform})")
            for i in range(args.bare):
                sandbox_id = f"bare-{platform}-{i}"
                bare.append((platform, root, sandbox_id))
                group.pids_of[sandbox_id] = start_bare(backend, root, platform, bundle, sandbox_id)
            groups.append(group)
        await asyncio.sleep(SETTLE_S)
        print(f"\nload average before the windows: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; window {args.window:.0f} s each")
        await measure(groups, args.window)
        report("gateway attached, freezing off (an idle user's sandbox as the fleet kept it before)", groups, groups[1])
        if args.freeze:
            await frozen_window(manager, backend, sandboxes, groups, args.window)
        for sandbox in sandboxes:
            await sandbox.client.close()
        for pids in full.pids_of.values():
            pids.update(child for pid in list(pids) for child in descendant_pids(pid))
        await asyncio.sleep(SETTLE_S)
        await measure(groups, args.window)
        report("gateway's end of each channel closed (the sandbox alone)", groups, groups[1])
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for platform, root, sandbox_id in bare:
            stop_bare(backend, root, platform, sandbox_id)
        await tear_down(manager, backend, home, cgroup_parent, pool)


async def main(home: Path, url: str, args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(args.timeout):
            await bench(home, url, args)
    except TimeoutError:
        raise SystemExit(f"stopped after {args.timeout:.0f} s; the figures above are partial") from None


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--sandboxes", type=int, default=5, help="idle fleet sandboxes (default 5)")
    cli.add_argument("--bare", type=int, default=2, help="bare `sleep infinity` sandboxes per platform (default 2)")
    cli.add_argument("--window", type=float, default=30.0, help="seconds per measuring window (default 30)")
    cli.add_argument("--no-ptrace", dest="ptrace", action="store_false", help="skip the bare sandboxes on ptrace")
    cli.add_argument("--no-freeze", dest="freeze", action="store_false", help="skip the window with the fleet sandboxes frozen")
    cli.add_argument("--keep", action="store_true", help="keep the temporary home (logs, database)")
    cli.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    args = cli.parse_args()
    if args.sandboxes < 1 or args.bare < 1:
        raise SystemExit("--sandboxes and --bare must be at least 1")
    home = Path(tempfile.mkdtemp(prefix="ic-", dir="/tmp"))  # short: the channel's socket path must stay within 107 bytes
    if not args.keep:
        atexit.register(shutil.rmtree, home, ignore_errors=True)  # registered before PostgreSQL's own stop: runs after it
    url = start_embedded(home / "pg")
    migrate(url)
    print(f"# Idle sandbox CPU ({os.cpu_count()} CPUs), --sandboxes {args.sandboxes} --bare {args.bare}; home {home}{' (kept)' if args.keep else ''}\n")
    asyncio.run(main(home, url, args))
