"""`mcpfleet up`: serve the fleet."""

from __future__ import annotations

import argparse

from core.settings import load_settings


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.serve import serve  # the gateway's imports are for this command alone

    return serve(load_settings(host=args.host, port=args.port))


def add_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="serve the fleet (MCP at /mcp)")
    up.add_argument("--host", help="address to listen on (MCPFLEET_HOST, default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port to listen on (MCPFLEET_PORT, default 8080)")
    up.set_defaults(func=cmd_up)
