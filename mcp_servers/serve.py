"""The command line every built-in server shares: stdio by default, Streamable HTTP on request.

In a sandbox the supervisor starts each server as a stdio child; `--transport
streamable-http` serves the same server directly (benchmarks, the conformance suite).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http import EventStore

from mcp_servers.stdio import serve_stdio


def parse_args(prog: str, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (streamable-http)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (streamable-http)")
    return parser.parse_args(argv)


def run(
    server: MCPServer[Any],
    args: argparse.Namespace,
    *,
    event_store: EventStore | None = None,
    retry_interval_ms: int | None = None,
) -> None:
    """Serve until the client goes away (stdio) or the process is stopped (HTTP)."""
    if args.transport == "stdio":
        anyio.run(serve_stdio, server)
        return
    import uvicorn  # only the HTTP transport needs it

    # Bound to a loopback address, the SDK also turns on DNS-rebinding protection.
    app = server.streamable_http_app(event_store=event_store, retry_interval=retry_interval_ms, host=args.host)
    # h11 strips the optional whitespace around header values (RFC 9110 5.5); httptools
    # passes it on, and the SDK compares Mcp-Name and Mcp-Param-* headers verbatim.
    uvicorn.run(app, host=args.host, port=args.port, http="h11", log_level="warning")
