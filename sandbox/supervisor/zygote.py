"""`python -m sandbox.supervisor.zygote FD MODULE...`: the fork server. One Python that imports the
`mcp` SDK and the built-in servers' modules once, from which each of those servers is forked,
instead of one interpreter per server importing them anew (under gVisor an import is hundreds of
system calls, and every interpreter holds its own copy of what it imported).

The supervisor executes it with the sandbox's common environment only, as it executes the launcher
(`launch`): it never holds a server's secrets, so no forked server finds a neighbour's in the memory
it was forked with. Each request on socket FD (SOCK_SEQPACKET) is one JSON message and, beside it (SCM_RIGHTS), the
server's stdin, stdout and stderr and the read end of a pipe holding its own environment, which
only the forked child reads, after it dropped to its own uid. The fork server answers with the
child's pid, and tells of each child's exit, since it is their parent:

    supervisor -> fork server  {"name", "argv": ["-m", MODULE, ARG...], "cwd", "uid", "gid",
                                "umask", "tmpdir"} + fds [stdin, stdout, stderr, environment]
    fork server -> supervisor  {"pid": PID} or {"error": WHY}   (in the order asked)
                               {"exited": PID, "code": CODE}    (as `Popen.returncode`: -SIGNAL if killed)

The child does what `subprocess.Popen` with `user`, `group`, `extra_groups=[]`, `umask`, `cwd` and
`start_new_session` does before executing, then what the launcher does after: its environment
from the pipe, then the module as `python -m` runs it. It runs the server at the top of this
module's `main`, out of the request loop, so the interpreter ends as it would after `python -m`.

What a module computes at import from its process is the fork server's, not its server's: so the
fork server runs with the servers' umask (the workspace server reads it at import); its uid,
environment and pid are root's and the common ones, and no built-in module reads them at import.
Forked servers share the fork server's address layout and hash seed (an executed one has its own).
Under gVisor a forked server shares few pages with the fork server for long: gVisor breaks
copy-on-write 2 MiB at a time, and Python writes to most of its pages (reference counts).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
from typing import Any

from sandbox.supervisor import launch

MAX_REQUEST = 64 * 1024
FDS_PER_REQUEST = 4
PR_SET_DUMPABLE = 4
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


class Child:
    """What a forked child runs, once the fork server's own state is gone."""

    def __init__(self, request: dict[str, Any], env_fd: int):
        self.request = request
        self.env_fd = env_fd


def preload(modules: list[str]) -> None:
    """Import what every forked server would import on its own; a module that fails to import is
    left to its server, which then fails as it would have without the fork server."""
    # A module's __main__ too, as a module of its own name: what `python -m` runs imports what it
    # needs, and its `main()` runs only under the name __main__ (the built-in servers' are guarded so).
    for name in ["mcp.server.mcpserver", "mcp.server.stdio", "anyio", *modules, *(f"{m}.__main__" for m in modules)]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any error of a module's import is its server's to report
            print(f"fork server: {name} not preloaded: {exc!r}", file=sys.stderr, flush=True)
    # The preloaded objects never change again: kept out of the collector's sight, a collection in a
    # child does not write to (and so copy) the pages they share with the fork server.
    gc.collect()
    gc.freeze()


def serve(sock: socket.socket) -> Child | None:
    """Answer requests until the supervisor goes away (returns None), or, in a forked child, return
    what it is to run, with nothing of the fork server's left open."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is not sock:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(sock)
                continue
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, FDS_PER_REQUEST)
            if not data:
                _close(fds)
                selector.close()
                return None
            request = json.loads(data)
            if len(fds) != FDS_PER_REQUEST:
                _close(fds)
                _send(sock, {"error": "a request without its four descriptors"})
                continue
            try:
                pid = os.fork()
            except OSError as exc:
                _close(fds)
                _send(sock, {"error": f"fork failed: {exc}"})
                continue
            if pid:
                _close(fds)
                _send(sock, {"pid": pid})
                continue
            # The child: the fork server's state goes first, so that no number of it is reused below.
            selector.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _close([wake_r, wake_w])
            sock.close()
            try:
                _become(request, fds)
            except BaseException as exc:  # noqa: BLE001 - a child must never return into the request loop
                print(f"fork server: {request.get('name')} could not start: {exc!r}", file=sys.stderr, flush=True)
                os._exit(127)
            return Child(request, fds[3])


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """In the child: its pipes as 0, 1 and 2 (the fork server's own stdio, so the received ones are
    above them), its own session, directory and identity, as `subprocess.Popen` would give it."""
    for target, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    os.setsid()  # its own process group, so it is killed with its children (start_new_session)
    if request.get("cwd"):
        os.chdir(request["cwd"])
    if request.get("uid") is not None:
        os.setgroups([])
        os.setgid(int(request["gid"]))
        os.setuid(int(request["uid"]))  # from root to another uid: every capability goes
    libc = ctypes.CDLL(None)
    # Forked from an undumpable fork server (and a change of uid leaves a process undumpable, its
    # /proc files root's): dumpable again, as after an exec, since no other server shares its uid.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # it dies with the fork server, its parent
    libc.prctl(PR_SET_NAME, str(request.get("name", ""))[:15].encode(), 0, 0, 0)  # its name in ps, not the fork server's
    if request.get("umask") is not None:
        os.umask(request["umask"])


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the supervisor is gone; the next read tells


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def run(child: Child) -> None:
    """In the forked child: the launcher's part (its own environment from its pipe), then the server."""
    request = child.request
    os.environ.update(launch.read_environment(child.env_fd))
    if request.get("tmpdir"):
        os.environ["TMPDIR"] = request["tmpdir"]
    tempfile.tempdir = None  # the fork server's choice is not the child's
    launch.run(list(request["argv"]))


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m sandbox.supervisor.zygote FD [MODULE...]")
    sock = socket.socket(fileno=int(sys.argv[1]))
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # root's, and nobody's to read
    preload(sys.argv[2:])
    _send(sock, {"preloaded": True})  # a template waits for it before its checkpoint (`ForkServer.warm`)
    child = serve(sock)
    if child is None:
        return
    del sock
    sys.argv = ["-m"]  # replaced by the server's own (launch.run)
    run(child)


if __name__ == "__main__":
    main()
