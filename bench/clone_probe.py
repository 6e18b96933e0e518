"""Can a new sandbox be a clone of a template checkpoint, given another user's workspace after it?

The snapshot-clone idea: restore one checkpoint of a booted sandbox (its servers imported, nobody's)
as each new sandbox, then bind the user's workspace. gVisor fixes a sandbox's mounts in its
checkpoint, so this tries, on real runsc, the one way in that needs no new gVisor: restore the
template's image under a new sandbox id with a bundle of its own, whose /workspace bind has
another user's workspace as its source. It reports what the restored servers then see in
/workspace (the template's files, the user's, or a failed restore) and what it cost.

    .venv/bin/python bench/clone_probe.py [--keep]

Everything lives in a temporary home under /tmp with its own runsc root, cgroup parent and
embedded PostgreSQL, removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.accounts import add_user
from core.db import migrate, open_pool, start_embedded
from sandbox.backends.base import SandboxSpec
from sandbox.backends.runsc import RunscBackend
from sandbox.boot import wait_ready
from sandbox.factory import sandbox_python
from sandbox.layout import make_channel, read_token
from sandbox.manager import Lifecycle, SandboxManager
from sandbox.running import Sandbox
from sandbox.servers import BUILTIN_SERVERS

TENANT = "probe"


async def tool(client, name: str, **arguments) -> str:
    result = await client.request("workspace", "tools/call", {"name": name, "arguments": arguments}, timeout=60)
    return json.dumps(result.get("structuredContent") or result.get("content"))[:300]


async def user_with_file(manager: SandboxManager, name: str, note: str) -> tuple[int, Sandbox]:
    async with manager.pool.connection() as conn:
        user_id = (await add_user(conn, name, tenant=TENANT)).user_id
    sandbox = await manager.ensure(user_id, TENANT, name)
    await tool(sandbox.client, "write_file", path=note, content=note)
    return user_id, sandbox


def clone_bundle(template: Sandbox, clone_dir: Path, clone_id: str) -> None:
    """The template's bundle with every path and name of the template swapped for the clone's."""
    shutil.copytree(template.directory / "bundle", clone_dir / "bundle", symlinks=True)
    config = clone_dir / "bundle" / "config.json"
    text = config.read_text().replace(str(template.directory), str(clone_dir)).replace(template.id, clone_id)
    config.write_text(text)


async def probe(home: Path, url: str) -> None:
    pool = await open_pool(url)
    backend = RunscBackend(home / "runsc", cgroup_parent=f"/mcpfleet-clone-{os.getpid()}", python=sandbox_python())
    manager = SandboxManager(home, pool, backend, BUILTIN_SERVERS, lifecycle=Lifecycle(housekeeping_interval_s=3600.0))
    clone_id = "sbx-clone000001"
    try:
        await manager.start()
        print(f"runsc {backend.gvisor.release} on {backend.platform}")
        template_user, template = await user_with_file(manager, "template", "template-only.txt")
        target_user, target = await user_with_file(manager, "target", "target-only.txt")
        await manager.reclaim(target_user)  # its workspace stays, unmounted
        # What the template's sentry caches of its own workspace: a file it read, a name it did not find.
        await tool(template.client, "read_file", path="template-only.txt")
        await tool(template.client, "read_file", path="target-only.txt")
        assert await manager.hibernate(template_user)
        print(f"template {template.id} hibernated: {template.layout.checkpoint}")

        layout = manager.steps.layout(clone_id)
        layout.dir.mkdir(mode=0o711)
        shutil.copytree(template.layout.tools, layout.tools, symlinks=True)
        make_channel(layout, manager.steps.uid, manager.steps.gid)
        manager.workspaces.mount(str(target_user), layout.workspace)
        clone_bundle(template, layout.dir, clone_id)
        # The supervisor in the image knows the template's token: the clone's channel must accept it.
        client = manager.steps.client(layout, read_token(template.layout))
        await client.listen()
        spec = SandboxSpec(
            id=clone_id, directory=layout.dir, workspace=layout.workspace, channel=layout.channel,
            limits=template.tier.limits, uid=manager.steps.uid, gid=manager.steps.gid,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            await backend.restore(spec, template.layout.checkpoint)
            await wait_ready(backend, client, clone_id, 60.0)
        except Exception as exc:
            print(f"RESULT: the clone did not restore: {type(exc).__name__}: {exc}")
            print((layout.dir / "console.log").read_text()[-3000:] if (layout.dir / "console.log").exists() else "")
            return
        print(f"clone restored and connected in {(time.perf_counter() - started) * 1e3:.0f} ms")
        listing = await tool(client, "list_dir")
        print(f"/workspace as the clone's servers see it: {listing}")
        for name in ("target-only.txt", "template-only.txt"):
            print(f"read_file {name} in the clone: {await tool(client, 'read_file', path=name)}")
        written = await tool(client, "write_file", path="written-by-clone.txt", content="clone")
        print(f"a write there: {written}")
        on_host = sorted(p.name for p in layout.workspace.iterdir())
        print(f"the target's workspace on the host now holds: {on_host}")
        sees_target = "target-only.txt" in listing
        sees_template = "template-only.txt" in listing
        print(
            "RESULT: "
            + ("the clone's servers see the target's workspace" if sees_target and not sees_template
               else "the clone's servers see the template's workspace" if sees_template
               else "the clone's servers see neither workspace")
        )  # fmt: skip
        await client.close()
    finally:
        with contextlib.suppress(Exception):
            await backend.destroy(clone_id)
        with contextlib.suppress(Exception):
            manager.workspaces.unmount(manager.steps.layout(clone_id).workspace)
        with contextlib.suppress(Exception):
            await manager.close()
        for container in await backend.list():
            await backend.destroy(container.id)
        backend.kill_strays(keep=set())
        manager.workspaces.cleanup(home, keep=set())
        await pool.close()


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = cli.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    url = start_embedded(home / "pg")
    migrate(url)
    try:
        asyncio.run(probe(home, url))
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
