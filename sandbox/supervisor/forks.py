"""The supervisor's side of the fork server (`zygote`): which servers are forked rather than
executed, the fork server's start (and restart, should it die), and each forked server as the
part of `subprocess.Popen` the supervisor uses (pid, pipes, returncode, wait).

Forked are the servers whose argv is `python -m MODULE ...` for a module of
`SupervisorConfig.fork_modules` (the built-in servers'), run by the supervisor's own interpreter
with the interpreter's environment unchanged: a published server with a dependency layer of its
own (PYTHONPATH) or another interpreter is executed as before (`uids.Start`), since what the fork
server imported is not what it would import.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any

from sandbox.supervisor.config import _PYTHON, PYTHON_FLAGS
from sandbox.supervisor.uids import SERVER_UMASK, ServerUids

ZYGOTE = "sandbox.supervisor.zygote"
REPLY_BYTES = 4096
ENV_BYTES = 60_000
"""What a pipe holds without its reader (64 KiB on Linux and gVisor), with room to spare."""


async def start_server(forks: ForkServer, uids: ServerUids, name: str, argv: list[str], cwd: str | None,
                       own_env: dict[str, str]) -> subprocess.Popen[bytes] | ForkedProcess:
    """A server's process, forked or executed, under its own uid (`uids`), its pipes ours."""
    form = forks.form(argv, own_env)
    if form is None:
        start = uids.start(name, argv, dict(os.environ), own_env)
        try:
            return subprocess.Popen(
                start.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                start_new_session=True,  # its own process group, so it is killed with its children
                **start.options,  # its own uid, environment and private dir
            )
        finally:
            start.close()
    uid = uids.uid_of(name)
    if uid is None:
        return await asyncio.to_thread(forks.spawn, name, form, cwd=cwd, own_env=own_env)
    return await asyncio.to_thread(
        forks.spawn, name, form, cwd=cwd, own_env=own_env, uid=uid, gid=uids.gid, umask=SERVER_UMASK,
        tmpdir=uids.private_dir(name, uid),
    )


class ForkedProcess:
    """A server the fork server forked; its exit is told by the fork server, its parent."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[bytes]):
        self.pid = 0
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self.error: str | None = None
        self._started = threading.Event()
        self._exited = threading.Event()

    def wait(self, timeout: float | None = None) -> int | None:
        self._exited.wait(timeout)
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def exited(self, code: int) -> None:
        self.returncode = code
        self._exited.set()


Process = subprocess.Popen[bytes] | ForkedProcess
"""A server's process, executed or forked."""


class ForkServer:
    def __init__(self, modules: list[str], umask: int = -1, preload: list[str] | None = None):
        """`umask`: the servers' (-1: the supervisor's), the fork server's too, since a module may read
        it at import (the workspace server does: `os.umask` can only be read by setting it).
        `preload`: the modules it imports before its first fork (default all); a module not among them
        (a server configured later) is imported by its server after the fork."""
        self.modules = list(modules)
        self.umask = umask
        self.preload = self.modules if preload is None else [m for m in preload if m in self.modules]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._asked: collections.deque[ForkedProcess] = collections.deque()
        self.preloaded = threading.Event()
        """The running fork server has imported what it preloads."""
        self._children: dict[int, ForkedProcess] = {}

    def form(self, argv: list[str], own_env: dict[str, str]) -> list[str] | None:
        """`-m MODULE ARG...` when the server is forked, else None (it is executed)."""
        at = 1
        while at < len(argv) and argv[at] in PYTHON_FLAGS:
            at += 1
        if not (self.modules and argv and _PYTHON.match(os.path.basename(argv[0]))):
            return None
        if argv[at:at + 1] != ["-m"] or at + 1 >= len(argv) or argv[at + 1] not in self.modules:
            return None
        if set(argv[1:at]) != set(PYTHON_FLAGS):
            return None
        changed = {k for k, v in own_env.items() if os.environ.get(k) != v}
        if any(k.startswith("PYTHON") for k in changed):
            return None  # its own import path or interpreter settings: not what the fork server has
        import shutil  # on a server's first start: not held by an idle supervisor

        found = shutil.which(argv[0], path=own_env.get("PATH", os.environ.get("PATH")))
        if found is None or os.path.realpath(found) != os.path.realpath(sys.executable):
            return None
        return argv[at:]

    def start(self) -> None:
        """Start the fork server, if it does not run (it imports for a while: start it early)."""
        with self._lock:
            self._ensure()

    def warm(self, modules: list[str], timeout: float) -> bool:
        """Start the fork server preloading `modules` too (those it may fork) and wait until it has
        imported them, blocking; whether it has. For a sandbox template: its clones fork at once."""
        with self._lock:
            if self._sock is None:
                self.preload = list(dict.fromkeys([*self.preload, *(m for m in modules if m in self.modules)]))
            self._ensure()
        return self.preloaded.wait(timeout)

    def spawn(self, name: str, form: list[str], *, cwd: str | None, own_env: dict[str, str], uid: int | None = None,
              gid: int | None = None, umask: int | None = None, tmpdir: str | None = None) -> ForkedProcess:
        """Fork a server, blocking (run it in a thread: the first fork waits for the imports).

        Its environment goes into a pipe the fork server passes on unread: only the child reads it."""
        data = json.dumps(own_env).encode()
        if len(data) > ENV_BYTES:
            raise RuntimeError(f"its environment is over {ENV_BYTES} bytes")
        ours: list[int] = []  # the supervisor's ends: stdin's write end, stdout's and stderr's read ends
        theirs: list[int] = []  # the child's: stdin's read end, stdout's and stderr's write ends, its environment
        try:
            for index in range(3):
                r, w = os.pipe()
                ours.append(w if index == 0 else r)
                theirs.append(r if index == 0 else w)
            env_r, env_w = os.pipe()
            theirs.append(env_r)
            try:
                os.write(env_w, data)  # the pipe holds it all: nobody waits for the child to read
            finally:
                os.close(env_w)
            proc = ForkedProcess(os.fdopen(ours[0], "wb", 0), os.fdopen(ours[1], "rb", 0), os.fdopen(ours[2], "rb", 0))
            ours = []
            request = {"name": name, "argv": form, "cwd": cwd, "uid": uid, "gid": gid, "umask": umask, "tmpdir": tmpdir}
            with self._lock:
                sock = self._ensure()
                self._asked.append(proc)
                try:
                    socket.send_fds(sock, [json.dumps(request).encode()], theirs)
                except OSError as exc:
                    self._asked.remove(proc)
                    raise RuntimeError(f"the fork server is gone: {exc}") from None
        finally:
            for fd in ours + theirs:
                os.close(fd)
        proc._started.wait()
        if proc.error is not None:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()
            raise RuntimeError(proc.error)
        return proc

    def close(self) -> None:
        """Stop the fork server: it exits when its socket closes (its children die with it)."""
        with self._lock:
            sock, proc = self._sock, self._proc
            self._sock = None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        if proc is not None:
            proc.wait()

    def _ensure(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.preloaded.clear()
        try:
            argv = [sys.executable, *PYTHON_FLAGS, "-m", ZYGOTE, str(theirs.fileno()), *self.preload]
            # The sandbox's common environment only, as the launcher's: no server's own (`zygote`).
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), umask=self.umask)
        finally:
            theirs.close()
        self._sock = ours
        threading.Thread(target=self._read, args=(ours, self._proc), name="fork-server", daemon=True).start()
        return ours

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """The fork server's answers and its children's exits, until it goes away."""
        while True:
            try:
                data = sock.recv(REPLY_BYTES)
            except OSError:
                data = b""
            if not data:
                break
            message: dict[str, Any] = json.loads(data)
            if "preloaded" in message:
                self.preloaded.set()
                continue
            if "exited" in message:
                child = self._children.pop(message["exited"], None)
                if child is not None:
                    child.exited(int(message["code"]))
                continue
            with self._lock:
                asked = self._asked.popleft()
            if "pid" in message:
                asked.pid = int(message["pid"])
                self._children[asked.pid] = asked
            else:
                asked.error = str(message.get("error"))
            asked._started.set()
        self._gone(sock, proc)

    def _gone(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """Its children die with it (their parent-death signal); make sure, and tell their owners."""
        code = proc.wait()
        with self._lock:
            if self._sock is sock:
                self._sock = None
                print(f"supervisor: the fork server exited ({code}); it starts again at the next fork",
                      file=sys.stderr, flush=True)
            asked, self._asked = list(self._asked), collections.deque()
        sock.close()
        for waiting in asked:
            waiting.error = "the fork server exited before forking it"
            waiting._started.set()
        children, self._children = self._children, {}
        for child in children.values():
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.exited(-signal.SIGKILL)
