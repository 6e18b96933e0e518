"""Serving an MCP server on stdio without threads.

The SDK's `stdio_server()` reads and writes stdin/stdout through a worker thread
per operation. Inside a gVisor sandbox every thread hand-off costs futex and
epoll system calls, which the ptrace platform makes expensive; reading and
writing the pipes on the event loop itself makes a tool call several times
cheaper there. The SDK's transport does the rest (`stdio_server` accepts any
async line source and sink).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

LINE_LIMIT = 64 * 1024 * 1024  # one JSON-RPC message per line; writes of files go through here


class _Lines:
    """Async iteration over the lines of a pipe, as the SDK's transport reads `stdin`."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class _Sink:
    """The `write` / `flush` pair the SDK's transport uses on `stdout`."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()


def _claim_std_fds() -> tuple[int, int]:
    """Keep private copies of fds 0 and 1 for the wire; point 0 at /dev/null and 1 at stderr,
    so a stray print or a child process cannot write into the protocol stream."""
    wire_in, wire_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return wire_in, wire_out


async def serve_stdio(server: MCPServer[Any]) -> None:
    wire_in, wire_out = _claim_std_fds()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(wire_out, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    lowlevel = server._lowlevel_server  # the SDK's own `run_stdio_async` drives the same object
    async with stdio_server(stdin=_Lines(reader), stdout=_Sink(writer)) as (read_stream, write_stream):  # type: ignore[arg-type]
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
