"""A server that exits at once, seen by a supervisor whose loop is slow to get to it: the exit is told as
such, at once, never as a server that "did not answer initialize" after the whole timeout.

On a loaded host the supervisor's loop can run between a server's start and its first request
(while the server's pipes are being connected), and take the end of the server's stdout there. Here
the supervisor is real and in this process, its server a real process, and the slow moment is made
certain: connecting the server's stdin waits until its stdout and stderr have ended.

And a server's start cancelled while it waits for `initialize` ends as "stopped", its process with it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from sandbox.supervisor.main import Supervisor

NEVER_ANSWERS = "import time; time.sleep(600)"
EXITS_AT_ONCE = "import os, sys; print('no such luck', file=sys.stderr); os.close(1); sys.exit(7)"
INIT_TIMEOUT = 20.0


def supervisor_of(directory: Path, server: str) -> Supervisor:
    """A supervisor in this process that runs `server` (Python code) as its one server, named "server"."""
    return Supervisor(SupervisorConfig(
        socket=str(directory / "gateway.sock"),  # nothing listens: the supervisor's messages are dropped
        servers=[ServerConfig(name="server", argv=[sys.executable, "-c", server])],
        init_timeout=INIT_TIMEOUT,
    ))


async def test_a_server_whose_stdout_ends_before_its_first_request_is_told_to_have_exited_at_once(monkeypatch):
    with tempfile.TemporaryDirectory(prefix="mcpf-cs-", dir="/tmp") as directory:
        child = supervisor_of(Path(directory), EXITS_AT_ONCE).children["server"]
        loop = asyncio.get_running_loop()
        connect_read_pipe, connect_write_pipe = loop.connect_read_pipe, loop.connect_write_pipe
        ended: list[asyncio.Event] = []  # the server's stdout and stderr, each set once it has ended
        slowed = []

        async def connect_read_pipe_telling_its_end(factory, pipe):
            end = asyncio.Event()
            ended.append(end)

            def protocol():
                made = factory()
                lost = made.connection_lost

                def connection_lost(exc):
                    lost(exc)
                    end.set()

                made.connection_lost = connection_lost
                return made

            return await connect_read_pipe(protocol, pipe)

        async def slow_connect_write_pipe(factory, pipe):
            # The loop runs meanwhile, as it may on a loaded host, until the server's output has ended.
            await asyncio.wait_for(asyncio.gather(*(end.wait() for end in ended)), INIT_TIMEOUT)
            slowed.append(len(ended))
            return await connect_write_pipe(factory, pipe)

        monkeypatch.setattr(loop, "connect_read_pipe", connect_read_pipe_telling_its_end)
        monkeypatch.setattr(loop, "connect_write_pipe", slow_connect_write_pipe)
        began = time.monotonic()
        run = asyncio.create_task(child.run())
        try:
            while child.state != "failed":
                assert time.monotonic() - began < INIT_TIMEOUT, "the server's exit was not told"
                await asyncio.sleep(0.01)
            took = time.monotonic() - began
        finally:
            monkeypatch.undo()
            await child.stop()
            await asyncio.wait_for(run, INIT_TIMEOUT)  # a stopped server's run ends by itself
        assert slowed == [2], "the server's stdin was connected before its stdout and stderr ended"
        assert child.error is not None and child.error.startswith("exited with code 7 before answering initialize"), child.error
        assert "no such luck" in child.error
        assert took < INIT_TIMEOUT / 2, took


async def test_a_start_cancelled_while_waiting_for_initialize_ends_as_stopped_and_its_process_with_it():
    with tempfile.TemporaryDirectory(prefix="mcpf-cs-", dir="/tmp") as directory:
        child = supervisor_of(Path(directory), NEVER_ANSWERS).children["server"]
        run = asyncio.create_task(child.run())
        began = time.monotonic()
        while child.pid is None:  # set just before its initialize is sent
            assert time.monotonic() - began < INIT_TIMEOUT, "the server never started"
            await asyncio.sleep(0.01)
        pid = child.pid
        await asyncio.sleep(0.1)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert (child.state, child.error) == ("failed", "stopped")
        while True:  # killed, and reaped by the supervisor's watch on it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() - began < INIT_TIMEOUT, "the server's process outlived its cancelled start"
            await asyncio.sleep(0.01)
