"""Workspaces mounted below a shared mount (`sandbox.mounts.share`), for real: loop mounts, mount
namespaces made as runsc makes them (the gofer's and the sandbox's), and a gVisor sandbox.

Every mount namespace made on the host copies the mounts there are, and runsc makes two per
sandbox, which keep their copies until they have pivoted into their own roots. Below a private
mount an unmount on the host leaves such a copy, and the image's loop device, to its namespace,
and the next mount of that workspace is refused ("in use") until the namespace lets go. Below
the shared mount the unmount reaches the copy. The promise to keep alongside: nothing mounted
later below it reaches a sandbox that is running, and nothing a namespace copied from the host
mounts comes back into the host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sandbox import mounts as hostmounts
from sandbox import tmpfs
from sandbox.workspaces import WorkspaceInUse, Workspaces
from tests.test_sandbox_workspaces import GID, QUOTA, UID, _loops_under, needs_loops, tmp, workspaces

__all__ = ["tmp", "workspaces"]  # fixtures

RUNSC_LIKE = {
    # runsc's gofer and sandbox: a user namespace of their own (the kernel turns their copies of shared
    # mounts into slaves, and locks them), then `mount --make-rslave /` anyway.
    "user namespace, as runsc": ["--user", "--map-root-user", "--propagation", "unchanged"],
    # Any other tool that makes a mount namespace as root and turns it into a slave (systemd, runc).
    "root, slave": ["--propagation", "slave"],
}


@contextmanager
def namespace_copied_now(*options: str) -> Iterator[int]:
    """A process in a mount namespace copied from this one now, which it keeps as long as it lives."""
    other = subprocess.Popen(["unshare", "--mount", *options, "sleep", "600"])
    try:
        deadline = time.monotonic() + 60
        while os.readlink(f"/proc/{other.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare made no mount namespace"
            time.sleep(0.01)
        while Path(f"/proc/{other.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, "unshare did not exec its command"
            time.sleep(0.01)
        yield other.pid
    finally:
        other.kill()
        other.wait()


def devices_in(pid: int, below: Path | None = None) -> set[str]:
    """The devices mounted in the mount namespace of `pid`; only at or below `below`, if given.

    `below` matters when other tests run beside this one: a loop device this test lets go of is
    attached and mounted again by another test's workspace elsewhere on the host, and that mount
    reaches a namespace copied from the host too. Under this test's own directory it is no other's.
    """
    with open(f"/proc/{pid}/mountinfo") as f:
        fields = [line.split() for line in f]
    return {
        each[2] for each in fields
        if below is None or each[4] == str(below) or each[4].startswith(f"{below}/")
    }


def loop_device(workspaces: Workspaces, key: str) -> str:
    loop = workspaces._loop_of(workspaces.path(key))
    assert loop is not None, f"{key} is not attached"
    return loop.device


def mount_unheld(workspaces: Workspaces, key: str, at: Path) -> None:
    """Mount `key`, which no mount namespace may hold: refused only while the kernel is still letting go
    of its loop device after the last unmount (asynchronous, and slow on a loaded host), never because a
    namespace still mounts it ("mounted by pid N")."""
    deadline = time.monotonic() + 60
    while True:
        try:
            workspaces.mount(key, at)
            return
        except WorkspaceInUse as exc:
            assert "being released" in str(exc) and time.monotonic() < deadline, exc
            time.sleep(0.1)


def released(workspaces: Workspaces, key: str) -> bool:
    """Whether the image of `key` is let go of its loop device, waited for as `mount_unheld` does."""
    deadline = time.monotonic() + 60
    while workspaces._loop_of(workspaces.path(key)) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@needs_loops
@pytest.mark.parametrize("options", RUNSC_LIKE.values(), ids=RUNSC_LIKE.keys())
def test_an_unmount_below_the_shared_mount_reaches_a_namespace_copied_while_it_was_mounted(workspaces, tmp, options):
    parent = tmp / "sandboxes"
    parent.mkdir()
    assert hostmounts.share(parent) is None
    workspaces.create("shared", QUOTA)
    workspaces.create("private", QUOTA)
    workspaces.mount("shared", parent / "a")
    workspaces.mount("private", tmp / "private")  # below no shared mount: how it was before
    tmpfs.mount(parent / "channel", size_bytes=tmpfs.CHANNEL_BYTES, inodes=tmpfs.CHANNEL_INODES, uid=UID, gid=GID)
    mounted = hostmounts.mount_at(parent / "channel")  # a sandbox's channel, mounted there too
    assert mounted is not None
    channel = mounted.device
    shared, private = loop_device(workspaces, "shared"), loop_device(workspaces, "private")
    with namespace_copied_now(*options) as other:
        assert {shared, private, channel} <= devices_in(other, below=tmp)
        workspaces.unmount(parent / "a")
        workspaces.unmount(tmp / "private")
        tmpfs.unmount(parent / "channel")
        assert shared not in devices_in(other, below=tmp) and channel not in devices_in(other, below=tmp)
        mount_unheld(workspaces, "shared", parent / "b")  # the copy went with the unmount here
        # The control: the copy of the private mount stays in the namespace, holding the image.
        assert private in devices_in(other, below=tmp)
        with pytest.raises(WorkspaceInUse, match=rf"mounted by pid {other} \(sleep\)"):
            workspaces.mount("private", tmp / "again")
        # Mounted anew, the workspace reaches the copy too (the namespace has not pivoted away), and
        # its unmount takes it away again: at no time does the namespace keep it alone.
        again = loop_device(workspaces, "shared")
        assert again in devices_in(other, below=tmp)
        workspaces.unmount(parent / "b")
        assert again not in devices_in(other, below=tmp) and released(workspaces, "shared")
    mount_unheld(workspaces, "private", tmp / "again")  # the namespace is gone, and its copy with it
    workspaces.unmount(tmp / "again")


@needs_loops
@pytest.mark.parametrize("options", RUNSC_LIKE.values(), ids=RUNSC_LIKE.keys())
def test_nothing_a_namespace_copied_from_the_host_mounts_comes_back(tmp, options):
    parent = tmp / "sandboxes"
    (parent / "victim").mkdir(parents=True)
    assert hostmounts.share(parent) is None
    with namespace_copied_now(*options) as other:
        planted = subprocess.run(
            ["nsenter", f"--target={other}", "--mount", *(["--user", "--preserve-credentials"] if "--user" in options else []),
             "mount", "-t", "tmpfs", "planted", str(parent / "victim")],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert planted.returncode == 0, planted.stderr  # it may mount in its own copy ...
        assert "planted" in Path(f"/proc/{other}/mountinfo").read_text()
        assert hostmounts.mount_at(parent / "victim") is None  # ... which is a slave: nothing comes back here


@needs_loops
def test_share_is_idempotent_hides_nothing_and_is_undone_only_when_empty(tmp):
    parent = tmp / "sandboxes"
    (parent / "kept").mkdir(parents=True)
    (parent / "kept" / "file").write_text("here")
    assert hostmounts.share(parent) is None
    assert hostmounts.share(parent) is None  # a restarted gateway finds it there and leaves it
    [mount] = [m for m in hostmounts.mounts() if m.mountpoint == parent]
    assert hostmounts.is_shared(mount)
    assert (parent / "kept" / "file").read_text() == "here"  # the dir itself, bound onto itself
    peers = [m for m in hostmounts.mounts() if set(m.propagation) & set(mount.propagation)]
    assert peers == [mount]  # a peer group of its own: what is mounted below it appears nowhere else here

    subprocess.run(["mount", "-t", "tmpfs", "below", str(parent / "kept")], check=True)
    assert hostmounts.unshare(parent) is False  # something is mounted below it: it stays
    subprocess.run(["umount", str(parent / "kept")], check=True)
    assert hostmounts.unshare(parent) is True
    assert hostmounts.mount_at(parent) is None and (parent / "kept" / "file").read_text() == "here"

    # Mounts made below the dir before it was shared (a gateway of old, its sandboxes still running)
    # would be hidden by the bind, with their loop devices: it is left for a start without them.
    subprocess.run(["mount", "-t", "tmpfs", "older", str(parent / "kept")], check=True)
    assert "mounts below it were made before it was shared" in (hostmounts.share(parent) or "")
    assert hostmounts.mount_at(parent) is None
    subprocess.run(["umount", str(parent / "kept")], check=True)


# -- a gVisor sandbox ---------------------------------------------------------------------------------


@needs_loops
@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")
async def test_a_running_gvisor_sandbox_never_holds_another_workspace_mounted_later(workspaces, tmp):
    from sandbox.backends.base import SandboxSpec
    from sandbox.backends.runsc import RunscBackend
    from sandbox.limits import Limits
    from sandbox.supervisor.config import SupervisorConfig

    parent = tmp / "sandboxes"
    parent.mkdir()
    assert hostmounts.share(parent) is None
    backend = RunscBackend(tmp / "runsc", cgroup_parent="/mcpfleet-test")
    sandbox_id = f"sbx-pr{secrets.token_hex(4)}"
    directory = parent / sandbox_id
    workspace, channel = directory / "workspace", directory / "channel"
    channel.mkdir(parents=True)
    os.chown(channel, UID, GID)
    SupervisorConfig(socket="/run/mcpfleet/gateway.sock", servers=[]).write(channel / "supervisor.json", owner=(UID, GID))
    workspaces.create("mine", QUOTA)
    workspaces.create("theirs", QUOTA)
    workspaces.mount("mine", workspace)
    (workspace / "note").write_text("mine\n")

    try:
        await backend.start(SandboxSpec(sandbox_id, directory, workspace, channel, Limits(), UID, GID))
        processes = backend.host_processes(sandbox_id)
        assert processes, "no runsc process of the sandbox"
        workspaces.mount("theirs", parent / "other" / "workspace")
        (parent / "other" / "workspace" / "secret").write_text("theirs\n")
        theirs = loop_device(workspaces, "theirs")
        # Its gofer and sandbox pivoted into their own roots before it ran: no copy of the shared mount
        # is left in them for the other workspace to propagate into.
        for pid in processes:
            assert theirs not in devices_in(pid), (pid, Path(f"/proc/{pid}/mountinfo").read_text())
        _, seen = await backend.run_inside(sandbox_id, "cat /workspace/note; ls -a /workspace; find / -xdev -name secret 2>/dev/null; true", (UID, GID))
        assert seen.startswith("mine\n") and "secret" not in seen, seen
        workspaces.unmount(parent / "other" / "workspace")
        mount_unheld(workspaces, "theirs", parent / "other" / "again")  # nobody held it
        workspaces.unmount(parent / "other" / "again")
        assert await backend.run_inside(sandbox_id, "cat /workspace/note", (UID, GID)) == (0, "mine")  # its own stays bound in its gofer
    finally:
        await backend.destroy(sandbox_id)
    workspaces.unmount(workspace)
    mount_unheld(workspaces, "mine", tmp / "mine")  # the gofer is gone, and its hold on the image with it
    assert (tmp / "mine" / "note").read_text() == "mine\n"
    workspaces.unmount(tmp / "mine")
    assert _loops_under(tmp) == []
