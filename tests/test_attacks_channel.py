"""Attacks on what a sandbox can write on the host: its channel dir (/run/mcpfleet inside).

- The gateway (root) binds its socket in that dir, which the sandbox's uid (1000) can write (the
  supervisor, root inside, writes there; servers run under uids of their own and cannot): a symlink
  renamed over the socket's name between the bind and the chmod/chown must not make the gateway
  hand a host file to uid 1000. The listen that follows a resume is where the attack is made.
- Nothing the sandbox can write may live outside its quota: a `dd` into every writable place that
  is neither /workspace (its quota) nor /tmp (its memory) fails at once or stops small; in a
  registry trial run (a publisher's code), /workspace too stops at the trial's quota.

Against real runsc sandboxes run by a SandboxManager.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat

import pytest

from registry.trial import TRIAL_TIER, trial_run
from sandbox.manager import SANDBOX_GID, SANDBOX_UID
from sandbox.servers import ServerSpec
from sandbox.store import State
from tests.test_sandbox_runsc import backend, call, manager, users  # noqa: F401 (fixtures)
from tests.test_sandbox_supervisor import FIXTURE_SERVER, text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


def plant_symlink_as_the_sandbox(socket_path, target) -> None:
    """What a racer in the sandbox does: as uid 1000, rename a symlink over the socket's name."""
    directory = os.open(socket_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(SANDBOX_GID)
            os.setuid(SANDBOX_UID)
            racer = socket_path.name + ".racer"
            os.symlink(target, racer, dir_fd=directory)
            os.rename(racer, socket_path.name, src_dir_fd=directory, dst_dir_fd=directory)
            code = 0
        finally:
            os._exit(code)
    os.close(directory)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the racer could not plant its symlink"


STOP_LATER = """
import subprocess
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
subprocess.Popen(["sh", "-c", "sleep 1; kill -STOP PID"], **quiet)
"""


async def test_a_symlink_raced_over_the_socket_never_hands_a_host_file_to_the_sandbox(
    manager, users, monkeypatch, tmp_path
):
    user_id, tenant, name = await users("mallory")
    sandbox = await manager.ensure(user_id, tenant, name)
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$6$not-yours:19000:0:99999:7:::\n")
    os.chmod(shadow, 0o640)
    before = shadow.stat()
    assert before.st_uid == 0

    # The racer wins the race outright: its symlink is in place the moment the socket is bound.
    real_bind = socket.socket.bind
    planted = []

    def bind_then_race(sock, address):
        real_bind(sock, address)
        if address == str(sandbox.client.socket_path):
            plant_symlink_as_the_sandbox(sandbox.client.socket_path, shadow)
            planted.append(address)

    monkeypatch.setattr(socket.socket, "bind", bind_then_race)
    # The user would make hibernation fail by stopping their supervisor, so that the gateway listens
    # again next to a sandbox that lives on; but servers run under uids of their own and may not
    # signal the supervisor (root inside), so the sandbox hibernates, and the gateway listens again
    # when it resumes: the racer wins there.
    supervisor = sandbox.client.supervisor["pid"]
    stop = STOP_LATER.replace("PID", str(supervisor)).replace("sleep 1; ", "")
    await call(sandbox, "run_python", code=stop + "\nimport time; time.sleep(1)")
    assert text(await call(sandbox, "echo", text="not stopped")) == "not stopped"
    assert await manager.hibernate(user_id, "the attack's") is True
    with contextlib.suppress(Exception):  # the racer's symlink may cost the resume: a fresh sandbox then
        await manager.ensure(user_id, tenant, name)
    monkeypatch.undo()

    assert planted, "the gateway never listened again"
    after = shadow.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (before.st_uid, before.st_gid, 0o640)
    assert shadow.read_text().startswith("root:")


FILL = r"""
import json, os
SKIP = ("/tmp", "/proc", "/sys") + EXTRA
MiB = 1024 * 1024
places = set()
for line in open("/proc/self/mountinfo"):
    at = line.split()[4]
    if any(at == s or at.startswith(s + "/") for s in SKIP):
        continue
    for directory, dirs, _ in os.walk(at):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in SKIP]
        if directory.count("/") - at.count("/") >= 2 or directory.startswith(("/usr", "/lib", "/opt/mcpfleet/lib")):
            dirs[:] = []
        if os.access(directory, os.W_OK):
            places.add(directory)
written = {}
for directory in sorted(places):
    path = os.path.join(directory, "fill")
    total = 0
    try:
        with open(path, "wb") as f:
            chunk = b"\0" * MiB
            for _ in range(300):
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
                total += MiB
    except OSError:
        pass  # ENOSPC, EROFS, EACCES: where it stops is what counts
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    written[directory] = total
print(json.dumps(written))
"""


async def test_a_disk_filler_finds_no_writable_place_outside_its_quota(manager, users):
    sandbox = await manager.ensure(*await users("filler"))
    outcome = text(await call(sandbox, "run_python", code=FILL.replace("EXTRA", '("/workspace",)')))
    written = json.loads(outcome.splitlines()[-1])
    # The channel is the supervisor's (root inside); a server, under a uid of its own, cannot write it.
    assert "/run/mcpfleet" not in written, written
    over = {place: n for place, n in written.items() if n > 2 * 1024 * 1024}
    assert not over, f"written outside the quota (bytes): {over}"
    # The sandbox is unharmed, and its channel still carries calls.
    assert text(await call(sandbox, "echo", text="still here")) == "still here"


async def test_code_on_trial_fills_nothing_but_its_own_small_workspace(backend, home):
    spec = ServerSpec("fixture", ("python", "-c", FIXTURE_SERVER))
    code = FILL.replace("EXTRA", "()")
    trial = await trial_run(backend, home, spec, None, call=("run_python", {"code": code}))
    assert trial.error is None, trial.error
    written = json.loads(text(trial.call_result).splitlines()[-1])
    assert "/workspace" in written and "/run/mcpfleet" not in written, written
    assert written.pop("/workspace") <= TRIAL_TIER.disk_bytes
    over = {place: n for place, n in written.items() if n > 2 * 1024 * 1024}
    assert not over, f"written outside the quota (bytes): {over}"
    assert not list((home / "sandboxes").glob("trial-*")), "the trial left its files behind"
