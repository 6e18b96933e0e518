"""Many hibernated sandboxes on one node, measured: N users' sandboxes started and hibernated one after
another, then a sample of them resumed to a tool result, on real runsc.

Each sandbox is started for a new user and hibernated at once, before any call (`--called` makes
one call first: its fork server and workspace server are then in its image, about 8x the disk).
`--sealed` seals each image as the fleet does (core.sealed_images: compressed, then encrypted under
a data key from an OpenBao the bench starts under its temporary home).
Hibernated sandboxes hold no memory and no process: what they cost is disk, which is checked
before each one; the bench stops, failing, when the next image would leave less than
`--reserve-gib` free. A start, hibernation or resume that fails ends the bench with an error.

    .venv/bin/python bench/hibernated_many.py [--sandboxes 1000] [--resumes 20] [--called] [--sealed] [--boot] [--timeout 3600]

Everything lives in a temporary home under /tmp with its own runsc root, cgroup parent and
embedded PostgreSQL, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedded_home import home_manager, run_in_home  # beside this script
from lifecycle_report import MiB, mem_info, row  # beside this script
from sandbox_lifecycle import first_result, vault  # beside this script

from core.accounts import add_user
from core.openbao import EmbeddedOpenBao
from core.sealed_images import KEY_FILE, SealedImages
from sandbox import store
from sandbox.layout import tree_bytes
from sandbox.manager import SandboxManager
from sandbox.store import State

TENANT = "many"
GiB = 1024**3


async def hibernate_many(manager: SandboxManager, n: int, called: bool, sealed: bool, reserve: int,
                         times: dict[str, list[float]]) -> list[int]:
    """Start and hibernate n new users' sandboxes one by one; their user ids."""
    users: list[int] = []
    image = 0
    for i in range(n):
        free = shutil.disk_usage(manager.home).free
        if free - image < reserve:
            raise RuntimeError(f"stopped after {i} sandboxes: {free / GiB:.1f} GiB free, and the next image "
                               f"({image / MiB:.0f} MiB) would leave less than {reserve / GiB:.0f} GiB")
        name = f"u{i}"
        async with manager.pool.connection() as conn:
            user = (await add_user(conn, name, tenant=TENANT)).user_id
        started = time.perf_counter()
        sandbox = await manager.ensure(user, TENANT, name)
        if called:
            await first_result(sandbox)
        times["start"].append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        if not await manager.hibernate(user):
            raise RuntimeError(f"the sandbox of {name} did not hibernate")
        times["hibernate"].append((time.perf_counter() - started) * 1e3)
        image = tree_bytes(sandbox.layout.checkpoint)
        if sealed and not (sandbox.layout.checkpoint / KEY_FILE).is_file():
            raise RuntimeError(f"the image of {name} was not sealed")
        times["image"].append(image / MiB)
        users.append(user)
        if (i + 1) % 100 == 0:
            print(f"{i + 1} hibernated; {shutil.disk_usage(manager.home).free / GiB:.1f} GiB free; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return users


async def bench(home: Path, url: str, args: argparse.Namespace) -> None:
    bao = EmbeddedOpenBao(home / "vault")
    try:
        images = SealedImages(vault(home, bao)) if args.sealed else None
        await fill(home, url, args, images)
    finally:
        await asyncio.to_thread(bao.stop)


async def fill(home: Path, url: str, args: argparse.Namespace, images: SealedImages | None) -> None:
    times: dict[str, list[float]] = {"start": [], "hibernate": [], "image": [], "resume": []}
    available_before = mem_info("MemAvailable")
    free_before = shutil.disk_usage(home).free
    async with home_manager(home, url, "many", TENANT, clone_templates=not args.boot, images=images) as (manager, backend):
        await manager.start()
        print(f"runsc {backend.gvisor.release} on {backend.platform}; {args.sandboxes} sandboxes, "
              f"{'booted' if args.boot else 'cloned'}, hibernated {'after one call' if args.called else 'before any call'}"
              f"{', images sealed (compressed, encrypted)' if images else ''}; "
              f"{shutil.disk_usage(home).free / GiB:.1f} GiB free\n", flush=True)
        started = time.perf_counter()
        users = await hibernate_many(manager, args.sandboxes, args.called, images is not None, int(args.reserve_gib * GiB), times)
        filled_s = time.perf_counter() - started
        async with manager.pool.connection() as conn:
            rows = [r for r in await store.list_sandboxes(conn) if r["tenant"] == TENANT]
        hibernated = sum(r["state"] == State.HIBERNATED for r in rows)
        on_disk = tree_bytes(home / "sandboxes")
        used = free_before - shutil.disk_usage(home).free  # workspaces and the database too
        running = len(await backend.list())
        available_after = mem_info("MemAvailable")
        for user in random.Random(1).sample(users, min(args.resumes, len(users))):
            started = time.perf_counter()
            sandbox = await manager.ensure(user, TENANT, f"u{users.index(user)}")
            await first_result(sandbox)
            times["resume"].append((time.perf_counter() - started) * 1e3)
            if not await manager.hibernate(user):
                raise RuntimeError(f"sandbox {sandbox.id} did not hibernate again")
    if hibernated != args.sandboxes:
        raise RuntimeError(f"{hibernated} of {args.sandboxes} sandboxes are Hibernated")
    print(f"\n{hibernated} sandboxes hibernated in {filled_s / 60:.1f} min; sandboxes dir {on_disk / GiB:.2f} GiB, "
          f"{used / GiB:.2f} GiB of disk used in all (workspaces, database); "
          f"runsc sandboxes running meanwhile: {running}; host memory available {available_before / GiB:.1f} GiB "
          f"before, {available_after / GiB:.1f} GiB with all hibernated; load average after {os.getloadavg()[0]:.2f}\n")
    print("| measure | median | p99 | n | target | |")
    print("|---|---:|---:|---:|---|---:|")
    print(row(f"start ({'booted' if args.boot else 'cloned'}){' → first tool result' if args.called else ''}", times["start"], "ms", ""))
    print(row("hibernate", times["hibernate"], "ms", ""))
    print(row("checkpoint image", times["image"], "MiB", ""))
    print(row(f"resume of a random one of {hibernated} → first tool result", times["resume"], "ms", "≤ 300 ms"))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--sandboxes", type=int, default=1000, help="how many to hibernate (default 1000)")
    cli.add_argument("--resumes", type=int, default=20, help="random ones resumed at the end (default 20)")
    cli.add_argument("--called", action="store_true", help="one tool call before each hibernation")
    cli.add_argument("--boot", action="store_true", help="boot each sandbox rather than clone it")
    cli.add_argument("--sealed", action="store_true", help="seal each image as the fleet does (compressed, encrypted)")
    cli.add_argument("--reserve-gib", type=float, default=5.0, help="disk left free at the least (default 5)")
    cli.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600)")
    args = cli.parse_args()
    run_in_home("hm-", lambda home, url: bench(home, url, args), args.timeout)
