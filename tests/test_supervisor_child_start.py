"""A server that exits at once, seen by a supervisor whose loop is slow to get to it: the exit is told as
such, at once, never as a server that "did not answer initialize" after the whole timeout.

On a loaded host the supervisor's loop can run between a server's start and its first request
(while the server's pipes are being connected), and take the end of the server's stdout there. Here
the supervisor is real and in this process, its server a real process, and the slow moment is made
certain: connecting the server's stdin waits until its stdout has ended.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from sandbox.supervisor.main import Supervisor

EXITS_AT_ONCE = "import os, sys; print('no such luck', file=sys.stderr); os.close(1); sys.exit(7)"
INIT_TIMEOUT = 20.0


async def test_a_server_whose_stdout_ends_before_its_first_request_is_told_to_have_exited_at_once(monkeypatch):
    with tempfile.TemporaryDirectory(prefix="mcpf-cs-", dir="/tmp") as directory:
        config = SupervisorConfig(
            socket=str(Path(directory) / "gateway.sock"),  # nothing listens: the supervisor's messages are dropped
            servers=[ServerConfig(name="gone", argv=[sys.executable, "-c", EXITS_AT_ONCE])],
            init_timeout=INIT_TIMEOUT,
        )
        supervisor = Supervisor(config)
        child = supervisor.children["gone"]
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
