"""A server's stdout and stderr as plain asyncio pipe transports whose callbacks hand each line to
the server's `ChildServer` as it arrives, with no task or scheduled callback in between: under
gVisor every syscall costs. Its exit is waited for in a thread, as asyncio's own child watcher does."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from typing import TYPE_CHECKING, Protocol

from sandbox import wire

if TYPE_CHECKING:
    from sandbox.supervisor.forks import ForkedProcess


class PipeOwner(Protocol):
    def on_stdout_line(self, line: bytes) -> None: ...
    def on_stderr_line(self, line: bytes) -> None: ...
    def on_stdout_closed(self) -> None: ...
    def stdout_unreadable(self, exc: ValueError) -> None: ...


class PipeReader(asyncio.Protocol):
    def __init__(self, pipes: Pipes, fd: int):
        self._pipes = pipes
        self._fd = fd

    def data_received(self, data: bytes) -> None:
        self._pipes.pipe_data_received(self._fd, data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._pipes.pipe_connection_lost(self._fd, exc)


class Pipes:
    """The child's stdout and stderr, cut into lines and handed to its owner as they arrive."""

    def __init__(self, child: PipeOwner):
        loop = asyncio.get_running_loop()
        self._child = child
        self._stdout = wire.LineSplitter()
        self._stderr = wire.LineSplitter(limit=64 * 1024)
        self._stdout_closed = loop.create_future()
        self._exited = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            try:
                lines = self._stdout.feed(data)
            except ValueError as exc:
                self._child.stdout_unreadable(exc)
                return
            for line in lines:
                self._child.on_stdout_line(line)
        else:
            try:
                lines = self._stderr.feed(data)
            except ValueError:
                lines = [b"(a line too long to keep)"]
            for line in lines:
                self._child.on_stderr_line(line)

    def pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        if fd == 1 and not self._stdout_closed.done():
            self._stdout_closed.set_result(None)
            self._child.on_stdout_closed()

    @property
    def stdout_closed(self) -> bool:
        """Whether the child's stdout has ended (its owner was told, by `on_stdout_closed`)."""
        return self._stdout_closed.done()

    def process_exited(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    def watch(self, proc: subprocess.Popen[bytes] | ForkedProcess) -> None:
        """Wait for the child in a thread (what asyncio's own child watcher does, too)."""
        loop = asyncio.get_running_loop()

        def wait() -> None:
            proc.wait()
            loop.call_soon_threadsafe(self.process_exited)

        threading.Thread(target=wait, name=f"wait-{proc.pid}", daemon=True).start()

    async def exited(self) -> None:
        await self._exited

    async def finished(self) -> None:
        """Exited, and everything it wrote has been handled."""
        await asyncio.gather(self._stdout_closed, self._exited)
