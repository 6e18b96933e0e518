"""What a sandbox's life costs on real runsc: cold start, warm-pool claim, hibernate and resume
(each to the first tool result), the checkpoint's size, an idle sandbox's memory, and how many
fit on this machine.

Drives the SandboxManager directly (no gateway, no HTTP) with the servers users really get
(`sandbox.servers.BUILTIN_SERVERS`); the "first tool result" is a `tools/call` of the workspace
server's `list_dir`. The same call on a sandbox already running is measured in the same run, as
the baseline the other figures are read against. Everything lives in a temporary home under /tmp
(short: the channel's Unix socket path must stay within 107 bytes) with its own runsc root,
cgroup parent and embedded PostgreSQL, and is torn down at the end, on error too.

Each gVisor given with --gvisor (RUNSC:PLATFORM; default: Debian's runsc on ptrace, the baseline,
then the pinned 2024-07 runsc on systrap when scripts/setup.sh has unpacked it) is measured in
turn in the same run, each with its own runsc root and cgroup parent, and a last table sets them
side by side, as ratios to the first.

Each gVisor is measured twice by default (--fork-server both): with each built-in server executed
as a Python of its own (MCPFLEET_FORK_SERVER=0, the baseline), then with them forked from the
sandbox's fork server (sandbox/supervisor/zygote.py). Each run also says where its cold starts went:
`runsc run`, the supervisor up after it, each server from its start to its answer to `initialize`
(from the supervisor's log in the sandbox's console.log).

Each configuration is measured with its servers started at boot (MCPFLEET_START_SERVERS=boot, the
baseline) and on first use (--start-servers both, the default): a fresh sandbox's memory is read
after `ensure` and an idle pause, before its first call (by runsc process, and by process inside
the sandbox), and that first call, which then starts the workspace server, is timed on its own.
The cold start is `ensure` plus that first call (the pause left out). A sandbox's PSS counts its
share of the pages it maps from host files (the runsc binary, the Python inside), which every
other process mapping them splits: alone on the host, a fresh sandbox reads about 20 MiB more than
beside others. `--neighbours N` starts N idle sandboxes first and keeps them running, so each
figure is read as in a fleet; the "own memory" row leaves host files out and varies with neither.

The first gVisor is measured a second time with its checkpoint images sealed (core.sealed_images,
as the fleet does), against an embedded OpenBao the bench starts under its temporary home and
stops at the end: hibernate and resume then include the seal and unseal, whose own seconds are
shown too (--no-sealed skips it; a seal or unseal that fails, or an image left in the clear,
stops the bench).

Before the first gVisor (and before its sealed run), the same gVisor is measured as resume was
before its changes, for a before/after in one run (--no-before skips it): compressed images,
`RunscBackend(quick_restore=False)` (a `runsc delete` before each restore, `runsc state` in
settle), `SandboxManager(quick_resume=False)` (unseal after the mount, the used image deleted
before the resume returns) and no wake. Each resume's time is split into its phases (the table
under each configuration); the other configurations also measure a resume woken by the client's
handshake (`SandboxManager.wake`) whose first call comes WAKE_GAP_S later.

    .venv/bin/python bench/sandbox_lifecycle.py [--runs 5] [--density 10] [--gvisor runsc:ptrace ...] [--fork-server both|on|off]
        [--start-servers both|boot|first-use] [--neighbours N] [--no-before] [--no-sealed] [--keep]

p99 is nearest-rank: with fewer than 100 samples it is the slowest one.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import hvac

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fresh_memory import fresh_memory, sandbox_pids  # beside this script
from lifecycle_report import (  # beside this script
    Config,
    Density,
    MiB,
    Samples,
    cold_parts,
    compare,
    label,
    mem_info,
    report,
    report_parts,
)

from core.accounts import add_user
from core.db import migrate, open_pool, start_embedded
from core.openbao import EmbeddedOpenBao
from core.sealed_images import KEY_FILE, SUFFIX, SealedImages
from core.vault import MOUNT, SecretStore
from sandbox import store
from sandbox.backends.base import SandboxSpec
from sandbox.backends.runsc import CGROUP_ROOT, RunscBackend
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.factory import sandbox_python
from sandbox.gvisor import PINNED_RUNSC, Gvisor, choose
from sandbox.manager import Lifecycle, Sandbox, SandboxManager
from sandbox.memory import pss_bytes
from sandbox.servers import BUILTIN_SERVERS, FORK_SERVER_SETTING, START_SERVERS_SETTING
from sandbox.steps import ImageSealer

TENANT = "bench"
FIRST_CALL = ("workspace", "list_dir")
BASELINE_CALLS = 5
"""First-tool calls per run on a sandbox already running."""
IDLE_SETTLE_S = 2.0
"""How long a sandbox sits idle after its first call before its memory is read."""
WARM_WAIT_S = 180.0
WAKE_GAP_S = 0.2
"""Between a client's handshake and its first `tools/call`: an assumption (a model deciding on a
tool takes longer), so the woken row is read as what that gap buys, not as a measured client."""


class TimedSealer:
    """`SealedImages` that keeps how long each seal and unseal took (they run inside hibernate and resume)."""

    def __init__(self, images: ImageSealer, samples: Samples):
        self.images = images
        self.samples = samples

    def seal(self, directory: Path) -> None:
        started = time.perf_counter()
        self.images.seal(directory)
        self.samples.seal_ms.append(ms_since(started))

    def unseal(self, directory: Path) -> None:
        started = time.perf_counter()
        self.images.unseal(directory)
        self.samples.unseal_ms.append(ms_since(started))


async def first_result(sandbox: Sandbox) -> dict:
    server, tool = FIRST_CALL
    result = await sandbox.client.request(
        server, "tools/call", {"name": tool, "arguments": {}}, timeout=60
    )
    if result.get("isError"):
        raise RuntimeError(f"{server}/{tool} failed: {result}")
    return result


def timed(start: Callable[[SandboxSpec], Awaitable[None]], samples: Samples) -> Callable[[SandboxSpec], Awaitable[None]]:
    """`backend.start` (runsc run), keeping how long each took and when it returned."""

    async def start_timed(spec: SandboxSpec) -> None:
        started = time.perf_counter()
        await start(spec)
        samples.last_runsc_run = (ms_since(started), time.time())

    return start_timed


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1e3


def check_sealed(image: Path) -> None:
    """Fail the bench unless every file of the hibernated image is sealed, with its wrapped key beside them."""
    clear = [p.name for p in image.rglob("*") if p.is_file() and not p.name.endswith(SUFFIX) and p.name != KEY_FILE]
    if not (image / KEY_FILE).is_file() or clear:
        raise RuntimeError(f"checkpoint {image} is not sealed: key {'present' if (image / KEY_FILE).is_file() else 'missing'}, in the clear: {clear}")


def disk_bytes(root: Path) -> int:
    """Blocks actually allocated under `root` (as du counts them), not the files' apparent size."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.lstat().st_blocks * 512
    return total


async def hibernated_bytes(manager: SandboxManager, sandbox: Sandbox) -> int:
    """The checkpoint's size from the sandbox's row, which must say Hibernated: `manager.hibernate`
    returns True also when the checkpoint (or its seal) failed and the sandbox ended Failed."""
    async with manager.pool.connection() as conn:
        rows = await store.list_sandboxes(conn, include_ended=True)
    row = next((r for r in rows if r["id"] == sandbox.id), None)
    if row is None or row["state"] != store.State.HIBERNATED:
        found = f"{row['state']} ({row['reason']})" if row else "no row"
        raise RuntimeError(f"sandbox {sandbox.id} did not hibernate: {found}")
    return int(row["checkpoint_bytes"]) if row["checkpoint_bytes"] is not None else disk_bytes(sandbox.layout.checkpoint)


async def memory(manager: SandboxManager, sandbox: Sandbox) -> tuple[int, int]:
    backend = manager.backend
    assert isinstance(backend, RunscBackend)
    rss = await backend.memory_bytes(sandbox.id) or 0
    return rss, pss_bytes(sandbox_pids(backend, sandbox.id))


class Users:
    def __init__(self, manager: SandboxManager, prefix: str):
        self.manager = manager
        self.prefix = prefix
        """Each gVisor's users are its own (one database for the whole run)."""
        self.count = 0

    async def new(self, prefix: str) -> tuple[int, str, str]:
        self.count += 1
        name = f"{self.prefix}{prefix}{self.count}"
        async with self.manager.pool.connection() as conn:
            return (await add_user(conn, name, tenant=TENANT)).user_id, TENANT, name


# -- the phases ----------------------------------------------------------------------------------


async def lifecycle_runs(
    manager: SandboxManager, users: Users, runs: int, samples: Samples, config: Config
) -> None:
    """Per run: a new user's cold start, the baseline calls, idle memory, hibernate, resume; with
    `config.wake`, hibernate again and resume woken by the client's handshake."""
    sealed = config.sealed
    for _ in range(runs):
        user = await users.new("cold")
        started = time.perf_counter()
        sandbox = await manager.ensure(*user)
        ensure_ms = ms_since(started)
        samples.ensure_ms.append(ensure_ms)
        # Fresh and idle: what a sandbox holds before anything is asked of it (with servers started on
        # first use, its supervisor alone), then its first call, which starts the server it needs.
        await asyncio.sleep(IDLE_SETTLE_S)
        await fresh_memory(manager, sandbox, samples)
        started = time.perf_counter()
        await first_result(sandbox)
        samples.first_call_ms.append(ms_since(started))
        samples.cold_ms.append(ensure_ms + samples.first_call_ms[-1])
        cold_parts(samples, (sandbox.layout.dir / "console.log").read_text(errors="replace"))

        for _ in range(BASELINE_CALLS):
            started = time.perf_counter()
            await first_result(sandbox)
            samples.baseline_ms.append(ms_since(started))

        await asyncio.sleep(IDLE_SETTLE_S)
        rss, pss = await memory(manager, sandbox)
        samples.rss_mib.append(rss / MiB)
        samples.pss_mib.append(pss / MiB)

        started = time.perf_counter()
        if not await manager.hibernate(user[0]):
            raise RuntimeError(f"sandbox {sandbox.id} did not hibernate")
        samples.hibernate_ms.append(ms_since(started))
        samples.checkpoint_mib.append(await hibernated_bytes(manager, sandbox) / MiB)
        if sealed:
            check_sealed(sandbox.layout.checkpoint)

        started = time.perf_counter()
        resumed = await manager.ensure(*user)
        ensured = time.perf_counter()
        await first_result(resumed)
        samples.resume_ms.append(ms_since(started))
        samples.add_resume_phases(resumed.resume_phases, (ensured - started) * 1e3, ms_since(ensured))
        if config.wake:
            samples.woken_ms.append(await woken_resume(manager, user))
        await manager.reclaim(user[0])
    hibernations = runs * (2 if config.wake else 1)
    if sealed and not (len(samples.seal_ms) == len(samples.unseal_ms) == hibernations):
        raise RuntimeError(f"{hibernations} hibernations but {len(samples.seal_ms)} seals and {len(samples.unseal_ms)} unseals")


async def woken_resume(manager: SandboxManager, user: tuple[int, str, str]) -> float:
    """Hibernate, then as the gateway does when a client says `initialize` or `server/discover`
    (`gateway.wake`): wake, and send the first `tools/call` WAKE_GAP_S later. Milliseconds from
    that call to its result."""
    if not await manager.hibernate(user[0]):
        raise RuntimeError(f"the sandbox of {user[2]} did not hibernate")
    manager.wake(*user)
    await asyncio.sleep(WAKE_GAP_S)
    started = time.perf_counter()
    await first_result(await manager.ensure(*user))
    return ms_since(started)


async def warm_claims(
    manager: SandboxManager, users: Users, runs: int, samples: Samples
) -> None:
    """Pool of one: before each claim, wait until it holds a started sandbox."""
    manager.capacity.warm_pool_size = 1
    manager.refill_pool()
    for _ in range(runs):
        deadline = time.monotonic() + WARM_WAIT_S
        while not manager.running.warm:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the warm pool stayed empty for {WARM_WAIT_S:.0f} s"
                )
            await asyncio.sleep(0.1)
        pooled = {s.id for s in manager.running.warm}
        user = await users.new("warm")
        started = time.perf_counter()
        sandbox = await manager.ensure(*user)
        await first_result(sandbox)
        samples.warm_ms.append(ms_since(started))
        samples.warm_misses += sandbox.id not in pooled
        await manager.reclaim(user[0])
    manager.capacity.warm_pool_size = 0


async def density(manager: SandboxManager, users: Users, n: int) -> Density:
    """Start n sandboxes one after another (each to its first result), read memory, hibernate all."""
    found = Density(asked=n, available_before=mem_info("MemAvailable"))
    started: list[tuple[tuple[int, str, str], Sandbox]] = []
    for _ in range(n):
        user = await users.new("dense")
        try:
            sandbox = await manager.ensure(*user)
            await first_result(sandbox)
            started.append((user, sandbox))
        except (
            SandboxUnavailable,
            SandboxRpcError,
            TimeoutError,
            RuntimeError,
        ) as exc:  # a sandbox that does not start is the finding, not the end of the bench
            found.failed.append(f"{type(exc).__name__}: {exc}")
    await asyncio.sleep(IDLE_SETTLE_S)
    found.available_after = mem_info("MemAvailable")
    live = [
        s
        for _, s in started
        if await manager.backend.is_alive(s.id) and s.client.connected
    ]
    found.running = len(live)
    for sandbox in live:
        rss, pss = await memory(manager, sandbox)
        found.rss_bytes += rss
        found.pss_bytes += pss
    for user, sandbox in started:
        if await manager.hibernate(user[0]):
            found.hibernated += 1
            found.checkpoint_disk_bytes += disk_bytes(
                sandbox.layout.checkpoint
            )
    for user, _ in started:
        await manager.reclaim(user[0])
    return found


def configs(gvisors: list[Gvisor], sealed: bool, fork_server: str, before: bool, start_servers: str = "first-use") -> list[Config]:
    """Each gVisor, with its servers executed (the baseline) and forked from the fork server, as
    `fork_server` says; the first one again sealed right after it (so the two sit side by side); with
    `before`, the first one (and its sealed run) first as it was before the resume changes:
    compressed images, no quick restore or resume, no wake."""
    forks = {"both": (False, True), "on": (True,), "off": (False,)}[fork_server]
    first = gvisors[0]
    old = choose(first.runsc, first.platform, compress=True)
    found = [Config(old, quick=False, wake=False, fork_server=forks[0])] if before else []
    found += [Config(first, fork_server=f) for f in forks]
    if sealed:
        found += ([Config(old, sealed=True, quick=False, wake=False, fork_server=forks[0])] if before else [])
        found.append(Config(first, sealed=True, fork_server=forks[-1]))
    found += [Config(g, fork_server=f) for g in gvisors[1:] for f in forks]
    if start_servers != "both":
        return [dataclasses.replace(c, start_servers=start_servers) for c in found]
    # Each with its servers started at boot (the baseline) and then on first use, side by side.
    return [dataclasses.replace(c, start_servers=m) for c in found for m in ("boot", "first-use")]


def gvisors(given: list[str]) -> list[Gvisor]:
    """--gvisor RUNSC:PLATFORM[:compressed] values, else the system's runsc on ptrace and the pinned one on systrap."""
    if given:
        parts = [g.split(":") for g in given]
        return [choose(p[0], p[1] if len(p) > 1 else None, len(p) > 2 and p[2] == "compressed") for p in parts]
    found = [choose("runsc", "ptrace")]
    if PINNED_RUNSC.exists():
        found.append(choose(str(PINNED_RUNSC), "systrap"))
    return found


# -- setup and teardown ---------------------------------------------------------------------------


async def tear_down(manager: SandboxManager, backend: RunscBackend, home: Path, cgroup_parent: str, pool) -> None:
    """Everything a bench's manager ran, on error too: its sandboxes, strays, workspaces, cgroups, pool."""
    with contextlib.suppress(Exception):
        await manager.close()
    with contextlib.suppress(Exception):
        for container in await backend.list():
            await backend.destroy(container.id)
    backend.kill_strays(keep=set())
    manager.workspaces.cleanup(home, keep=set())
    remove_cgroup_parent(cgroup_parent)
    await pool.close()


def remove_cgroup_parent(parent: str) -> None:
    for controller in (
        [CGROUP_ROOT, *CGROUP_ROOT.glob("*")] if CGROUP_ROOT.is_dir() else []
    ):
        with contextlib.suppress(OSError):
            (controller / parent.lstrip("/")).rmdir()


async def bench(
    home: Path, url: str, args: argparse.Namespace, config: Config, index: int, secrets: SecretStore | None
) -> Samples:
    gvisor = config.gvisor
    print(f"\n## {label(config)} ({gvisor.runsc})\n")
    home = home / f"g{index}"  # short: the channel's socket path must stay within 107 bytes
    pool = await open_pool(url)
    samples, dense = Samples(), None
    cgroup_parent = f"/mcpfleet-bench-{os.getpid()}-{index}"
    backend = RunscBackend(
        home / "runsc", runsc=gvisor.runsc, platform=gvisor.platform, cgroup_parent=cgroup_parent, python=sandbox_python(),
        quick_restore=config.quick,
    )
    os.environ[FORK_SERVER_SETTING] = "1" if config.fork_server else "0"  # read where each sandbox's config is written
    os.environ[START_SERVERS_SETTING] = config.start_servers
    backend.gvisor = gvisor  # as chosen, compression included
    backend.start = timed(backend.start, samples)  # type: ignore[method-assign]
    # No housekeeping during the bench: nothing should hibernate or reclaim on its own.
    lifecycle = Lifecycle(
        warm_pool_size=0,
        max_running=max(50, args.density + args.neighbours + 2),
        housekeeping_interval_s=3600.0,
    )
    images = TimedSealer(SealedImages(secrets), samples) if config.sealed and secrets else None
    if config.sealed and images is None:
        raise RuntimeError("a sealed configuration without a secret store")
    servers = [s for s in BUILTIN_SERVERS if not args.servers or s.name in args.servers.split(",")]
    manager = SandboxManager(home, pool, backend, servers, lifecycle=lifecycle, images=images, quick_resume=config.quick)
    try:
        await manager.start()
        users = Users(manager, prefix=f"g{index}-")
        for _ in range(args.neighbours):  # idle for the whole run; torn down with the rest
            await manager.ensure(*await users.new("idle"))
        await lifecycle_runs(manager, users, args.runs, samples, config)
        # Sealing touches only hibernate and resume: density and the warm pool are the unsealed run's.
        if args.density > 0 and not config.sealed:
            dense = await density(manager, users, args.density)
        if not config.sealed:
            await warm_claims(manager, users, args.runs, samples)
    finally:
        await tear_down(manager, backend, home, cgroup_parent, pool)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
        report(samples, dense, home)
        report_parts(samples)
    return samples


def vault(home: Path, bao: EmbeddedOpenBao) -> SecretStore:
    """Start the bench's own OpenBao (under its temporary home, never the fleet's) and a store on it."""
    bao.start()
    if not bao.owned:
        raise RuntimeError(f"an OpenBao already runs for {home}: the bench must start its own")
    print(f"\nembedded OpenBao at {bao.addr}, started and unsealed in {bao.start_s:.2f} s")
    return SecretStore(lambda: hvac.Client(bao.addr, token=bao.token()), MOUNT, where=f"the bench's OpenBao at {bao.addr}")


async def main(home: Path, url: str, args: argparse.Namespace) -> None:
    bao = EmbeddedOpenBao(home / "vault")
    try:
        await run(home, url, args, bao)
    finally:
        await asyncio.to_thread(bao.stop)


async def run(home: Path, url: str, args: argparse.Namespace, bao: EmbeddedOpenBao) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with asyncio.timeout(args.timeout):
            results = []
            found = configs(gvisors(args.gvisor), args.sealed, args.fork_server, args.before, args.start_servers)
            for index, config in enumerate(found):
                secrets = await asyncio.to_thread(vault, home, bao) if config.sealed else None
                results.append((config, await bench(home, url, args, config, index, secrets)))
        if len(results) > 1:
            compare(results)
    except TimeoutError:
        print(
            f"\nstopped after {args.timeout:.0f} s; the figures above are partial",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument(
        "--runs", type=int, default=5, help="samples per lifecycle step (default 5)"
    )
    cli.add_argument(
        "--density",
        type=int,
        default=10,
        metavar="N",
        help="sandboxes started at once (default 10)",
    )
    cli.add_argument(
        "--keep", action="store_true", help="keep the temporary home (logs, database)"
    )
    cli.add_argument(
        "--gvisor", action="append", default=[], metavar="RUNSC:PLATFORM[:compressed]",
        help="a runsc and its platform to measure, in turn (repeat; the first is the baseline)",
    )
    cli.add_argument(
        "--no-before", dest="before", action="store_false",
        help="skip the first gVisor's baseline run as before the resume changes (compressed images, no quick resume, no wake)",
    )
    cli.add_argument(
        "--no-sealed", dest="sealed", action="store_false",
        help="skip the first gVisor's second run with sealed checkpoint images",
    )
    cli.add_argument(
        "--fork-server", choices=("both", "on", "off"), default="both",
        help="each gVisor with its servers executed (the baseline) and forked from the fork server (default both)",
    )
    cli.add_argument(
        "--start-servers", choices=("both", "boot", "first-use"), default="both",
        help="each configuration with its servers started at boot (the baseline) and on first use (default both)",
    )
    cli.add_argument(
        "--neighbours", type=int, default=0, metavar="N",
        help="idle sandboxes kept running beside the measured ones, as in a fleet (default 0)",
    )
    cli.add_argument(
        "--servers", default="", metavar="NAME,...",
        help="only these built-in servers (default all; the workspace server answers the first call)",
    )
    cli.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="give up after this many seconds (default 1800)",
    )
    args = cli.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if shutil.which("runsc") is None:
        raise SystemExit("runsc is not installed")

    home = Path(tempfile.mkdtemp(prefix="bl-", dir="/tmp"))
    if not args.keep:
        # Registered before the embedded PostgreSQL registers its own stop: exit handlers run last
        # registered first, so the server is down before its data dir goes.
        atexit.register(shutil.rmtree, home, ignore_errors=True)
    url = start_embedded(home / "pg")
    migrate(url)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# Sandbox lifecycle on runsc ({os.cpu_count()} CPUs, {mem_info('MemTotal') / 2**30:.1f} GiB)\n"
    )
    print(
        f"--runs {args.runs} --density {args.density} --neighbours {args.neighbours} --servers {args.servers or 'all'}; load average before (1, 5, 15 min): {load}; "
        f"first tool result = `{FIRST_CALL[0]}` `{FIRST_CALL[1]}`; home {home}{' (kept)' if args.keep else ''}"
    )
    asyncio.run(main(home, url, args))
