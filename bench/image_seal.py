"""Sealing a used sandbox's checkpoint image, compressed (the fleet's way) against not compressed.

A sandbox is cloned for a new user on real runsc, its servers are called (the workspace server's
tool, a command through the exec server), and it is hibernated without sealing: that clear image is
the sample. Then, `--runs` times each and alternating, a copy of it is sealed with
`core.sealed_images.SealedImages` (data keys from an OpenBao the bench starts under its temporary
home), with and without compression, and unsealed again. Every unsealed copy must be bit for bit
the image, or the bench fails. Prints seal and unseal times (medians, p99) and sizes on disk, with
the compressed run against the uncompressed one.

    .venv/bin/python bench/image_seal.py [--runs 8]

Page-cache writeback makes single runs noisy (either way); `os.sync()` runs before each step.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from embedded_home import home_manager, run_in_home  # beside this script
from lifecycle_report import MiB, row  # beside this script
from sandbox_lifecycle import first_result, vault  # beside this script

from core.accounts import add_user
from core.openbao import EmbeddedOpenBao
from core.sealed_images import SealedImages
from sandbox.layout import tree_bytes

TENANT = "seal"


async def used_image(home: Path, url: str, into: Path) -> None:
    """A clone's clear checkpoint after calls to its servers, copied to `into`."""
    async with home_manager(home, url, "seal", TENANT) as (manager, _):
        async with manager.pool.connection() as conn:
            user = (await add_user(conn, "user", tenant=TENANT)).user_id
        await manager.start()
        sandbox = await manager.ensure(user, TENANT, "user")
        await first_result(sandbox)
        ran = await sandbox.client.request("exec", "tools/call", {"name": "run", "arguments": {"command": "echo ok"}}, timeout=60)
        if ran.get("isError"):
            raise RuntimeError(f"exec/run failed: {ran}")
        if not await manager.hibernate(user):
            raise RuntimeError("the sandbox did not hibernate")
        shutil.copytree(sandbox.layout.checkpoint, into)


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


async def bench(home: Path, url: str, args: argparse.Namespace) -> None:
    image = home / "image"
    await used_image(home, url, image)
    clear = digest(image)
    bao = EmbeddedOpenBao(home / "vault")
    try:
        store = vault(home, bao)
        times: dict[bool, dict[str, list[float]]] = {c: {"seal": [], "unseal": [], "size": []} for c in (False, True)}
        for _ in range(args.runs):
            for compress in (False, True):
                copy = home / "copy"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(image, copy)
                images = SealedImages(store, compress=compress)
                os.sync()
                started = time.perf_counter()
                await asyncio.to_thread(images.seal, copy)
                times[compress]["seal"].append((time.perf_counter() - started) * 1e3)
                times[compress]["size"].append(tree_bytes(copy) / MiB)
                os.sync()
                started = time.perf_counter()
                await asyncio.to_thread(images.unseal, copy)
                times[compress]["unseal"].append((time.perf_counter() - started) * 1e3)
                if digest(copy) != clear:
                    raise RuntimeError(f"an image sealed {'with' if compress else 'without'} compression did not unseal to itself")
    finally:
        await asyncio.to_thread(bao.stop)
    print(f"\nA used sandbox's checkpoint image: {tree_bytes(image) / MiB:.1f} MiB in the clear; {args.runs} seals and "
          f"unseals each way, alternating; load average after {os.getloadavg()[0]:.2f}\n")
    print("| measure | median | p99 | n | target | vs not compressed |")
    print("|---|---:|---:|---:|---|---:|")
    for key, what, unit in (("size", "sealed image on disk", "MiB"), ("seal", "seal", "ms"), ("unseal", "unseal", "ms")):
        base = sorted(times[False][key])[len(times[False][key]) // 2]
        print(row(f"{what}, not compressed", times[False][key], unit, ""))
        print(row(f"{what}, compressed (zstd)", times[True][key], unit, "", base))


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--runs", type=int, default=8, help="seals and unseals each way (default 8)")
    cli.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    arguments = cli.parse_args()
    run_in_home("is-", lambda home, url: bench(home, url, arguments), arguments.timeout)
