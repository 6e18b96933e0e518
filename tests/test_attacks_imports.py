"""Attacks on the product's own processes in a sandbox, from code the user runs there.

- Modules planted in /workspace (`sandbox/`, `mcp_servers/`, `mcp/`, `sitecustomize.py`) and in
  the user site dir under HOME=/workspace (a `.pth` file, `usercustomize.py`), waiting for the
  supervisor and the servers to start again after a fresh start forced by exceeding the memory
  limit: none of them may ever run in a product process.
- A start that never becomes ready, to keep the CPU that a starting sandbox may borrow beyond its
  tier's share: the share holds again after a short while, ready or not.
- `df`: what it shows of the host's disk (the root: nothing; the binds of the host's dirs: the
  host's size and usage, which runsc passes on) and of the workspace (its quota).

Against real runsc sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time

import pytest

from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.limits import Limits
from sandbox.servers import BUILTIN_SERVERS, START_SERVERS_SETTING, ServerSpec
from tests.test_sandbox_lifecycle import call, fleets, row_of, sh  # noqa: F401  (fleets: the fixture)

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

BUILTINS = {s.name: s for s in BUILTIN_SERVERS}
SERVERS = [
    BUILTINS["workspace"],
    BUILTINS["exec"],
    # As a published server runs: `python -c`, its install's entry point imported.
    ServerSpec("tool", ("python", "-c", "from mcp_servers.workspace.__main__ import main; main()")),
]

LOG = "/workspace/planted.log"
STOLEN = "/workspace/stolen.json"


def planted(name: str) -> str:
    """One line of Python that says it ran, where, and takes the supervisor's config if it can."""
    return (
        "import os, shutil, sys; "
        f"open({LOG!r}, 'a').write({name!r} + ' ' + str(os.getpid()) + ' ' + repr(sys.argv) + '\\n'); "
        f"os.path.exists('/run/mcpfleet/supervisor.json') and shutil.copy('/run/mcpfleet/supervisor.json', {STOLEN!r})"
    )


def plant_script(user_site: str) -> str:
    files = {
        "/workspace/sandbox/__init__.py": planted("sandbox"),
        "/workspace/sandbox/supervisor/__init__.py": planted("sandbox.supervisor"),
        "/workspace/sandbox/supervisor/__main__.py": planted("sandbox.supervisor.__main__"),
        "/workspace/mcp_servers/__init__.py": planted("mcp_servers"),
        "/workspace/mcp_servers/workspace/__init__.py": planted("mcp_servers.workspace"),
        "/workspace/mcp_servers/exec/__init__.py": planted("mcp_servers.exec"),
        "/workspace/mcp/__init__.py": planted("mcp"),
        "/workspace/sitecustomize.py": planted("sitecustomize"),
        f"{user_site}/usercustomize.py": planted("usercustomize"),
        f"{user_site}/planted.pth": planted("pth"),  # a .pth line that starts with `import` runs at startup
    }
    lines = []
    for path, code in files.items():
        lines.append(f"mkdir -p {path.rsplit('/', 1)[0]}")
        lines.append(f"cat > {path} <<'EOF'\n{code}\nEOF")
    return "\n".join(lines) + "\necho planted"


async def test_modules_planted_in_the_workspace_never_run_in_the_supervisor_or_the_servers(fleets):
    fleet = await fleets("imports")
    manager = await fleet.manager(servers=SERVERS)
    mallory = await fleet.user("mallory")
    sandbox = await manager.ensure(*mallory)
    major, minor = manager.backend.python.version.split(".")[:2]
    user_site = f"/workspace/.local/lib/python{major}.{minor}/site-packages"
    assert (await sh(sandbox, plant_script(user_site)))["stdout"] == "planted\n"

    # Over the memory limit (/tmp is memory): the sandbox is killed, the next call starts a fresh one.
    with contextlib.suppress(SandboxUnavailable, SandboxRpcError):
        await sh(sandbox, "dd if=/dev/zero of=/tmp/fill bs=1M count=2048")
    try:
        fresh = await manager.ensure(*mallory)
    except SandboxUnavailable as exc:
        pytest.fail(f"no fresh sandbox after the planting: {exc}")
    assert fresh.id != sandbox.id

    catalog = await fresh.client.catalog()
    assert {name: s["state"] for name, s in catalog.items()} == {"workspace": "ready", "exec": "ready", "tool": "ready"}
    await call(fresh, "write_file", server="workspace", path="a.txt", content="still mine")
    assert "still mine" in (await call(fresh, "read_file", server="tool", path="a.txt"))["content"][0]["text"]
    seen = await sh(fresh, f"cat {LOG} 2>&1; ls {STOLEN} 2>&1; echo done")
    assert f"{LOG}: No such file" in seen["stdout"], f"planted code ran in a product process:\n{seen['stdout']}"
    assert f"{STOLEN}: No such file" in seen["stdout"], seen

    # The user's own Python in a shell still finds what they put in the workspace.
    mine = await sh(fresh, "cd /workspace && mkdir -p mine && echo 'print(42)' > mine/__init__.py && python -c 'import mine'")
    assert mine["stdout"] == "42\n", mine


async def test_a_start_kept_from_becoming_ready_is_held_to_its_cpu_share(fleets, monkeypatch):
    # Servers started at boot: a server started on first use keeps no start from becoming ready.
    monkeypatch.setenv(START_SERVERS_SETTING, "boot")
    fleet = await fleets("boost")
    # A server that answers nothing for 20 s: the supervisor says hello only once every server has settled.
    stalling = ServerSpec("stall", ("python", "-c", "import time; time.sleep(20)"))
    manager = await fleet.manager(servers=[stalling])
    manager.start_boost_s = 2.0
    assert fleet.backend.start_cpus > Limits().cpus, "a start is boosted only on a machine with more than one CPU"
    oscar = await fleet.user("oscar")
    started = time.monotonic()
    starting = asyncio.create_task(manager.ensure(*oscar))
    try:
        quota = None
        while time.monotonic() - started < 12:
            running = [c.id for c in await fleet.backend.list() if c.status == "running"]
            quota = fleet.backend.cpu_quota_us(running[0]) if running else None
            if quota == Limits().cpu_quota_us:
                break
            await asyncio.sleep(0.5)
        assert not starting.done()
        assert quota == Limits().cpu_quota_us, f"still {quota} µs per period {time.monotonic() - started:.0f} s into the start"
    finally:
        with contextlib.suppress(SandboxUnavailable):
            await starting


HOLD_THE_CHANNEL = (
    "python -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/mcpfleet/gateway.sock')\" 2>&1 | tail -1"
)


async def test_a_failed_checkpoint_is_one_sentence_in_the_row_and_the_details_are_in_the_log(fleets, caplog):
    fleet = await fleets("ckpt")
    manager = await fleet.manager(servers=[BUILTINS["exec"]])
    peggy = await fleet.user("peggy")
    sandbox = await manager.ensure(*peggy)
    # Code in the sandbox could make gVisor unable to save it by holding a host socket open (the
    # channel's); servers, under uids of their own, cannot open it any more.
    held = await sh(sandbox, HOLD_THE_CHANNEL)
    assert "Permission denied" in held["stdout"], held
    # So the fault comes from the host: the image's dir is read-only (a tmpfs mounted over it).
    partial = sandbox.layout.checkpoint_partial
    partial.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(partial)], check=True)
    try:
        with caplog.at_level("WARNING"):
            hibernated = await manager.hibernate(peggy[0])
    finally:
        subprocess.run(["umount", str(partial)], check=False)
    row = await row_of(fleet.pool, sandbox.id)
    print(f"\n{row['state']}: {row['reason']}")
    assert row["state"] in ("Running", "Failed"), (hibernated, row)
    reason = row["reason"]
    assert reason.startswith("hibernation failed") and "\n" not in reason and len(reason) <= 200, reason
    assert "goroutine" not in reason and "/" not in reason, reason
    assert "runsc checkpoint of sandbox" in caplog.text  # the details went to the gateway's log


def df_sizes(stdout: str) -> dict[str, int]:
    """`df -k -P`'s lines as {mount point: total KiB}."""
    sizes = {}
    for line in stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6 and fields[1].isdigit():
            sizes[fields[-1]] = int(fields[1])
    return sizes


def total_kib(path) -> int:
    found = os.statvfs(path)
    return found.f_blocks * found.f_frsize // 1024


async def test_df_shows_the_workspace_quota_and_not_the_hosts_disk_at_the_root(fleets):
    fleet = await fleets("df")
    manager = await fleet.manager(servers=[BUILTINS["exec"]])
    trudy = await fleet.user("trudy")
    sandbox = await manager.ensure(*trudy)
    host_kib, quota_kib = total_kib(fleet.home), total_kib(sandbox.workspace)
    assert host_kib != quota_kib

    seen = (await sh(sandbox, "df -k -P 2>&1"))["stdout"]
    sizes = df_sizes(seen)
    assert sizes.get("/") not in (None, host_kib), f"the host's disk ({host_kib} KiB) shows at /:\n{seen}"
    assert sizes.get("/workspace") == quota_kib, seen

    # The root is in memory now, and still nobody's to write to inside.
    write = "for p in /x /etc/x /opt/mcpfleet/x /opt/mcpfleet/bin/x; do touch $p 2>/dev/null && echo wrote $p; done"
    tried = await sh(sandbox, f"{write}; rm /etc/passwd 2>/dev/null && echo removed; echo done")
    assert tried["stdout"] == "done\n", tried


@pytest.mark.xfail(strict=True, reason="runsc answers statfs on a bind with the host's statfs of its source")
async def test_df_shows_nothing_of_the_hosts_disk(fleets):
    fleet = await fleets("dfbinds")
    manager = await fleet.manager(servers=[BUILTINS["exec"]])
    sandbox = await manager.ensure(*await fleet.user("trent"))
    host_kib = total_kib(fleet.home)
    seen = (await sh(sandbox, "df -k -P 2>&1"))["stdout"]
    assert host_kib not in df_sizes(seen).values(), f"the host's disk ({host_kib} KiB) shows in df:\n{seen}"
