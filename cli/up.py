"""`mcpfleet up`: serve the fleet."""

from __future__ import annotations

import argparse
import os

from core.settings import load_settings


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.serve import serve  # the gateway's imports are for this command alone

    replicas = args.replicas if args.replicas is not None else int(os.environ.get("MCPFLEET_REPLICAS") or 1)
    if replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    return serve(load_settings(host=args.host, port=args.port), replicas=replicas)


def add_commands(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="serve the fleet (MCP at /mcp)")
    up.add_argument("--host", help="address to listen on (MCPFLEET_HOST, default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port to listen on (MCPFLEET_PORT, default 8080)")
    up.add_argument("--replicas", type=int,
                    help="gateway processes behind the one port (SO_REUSEPORT; MCPFLEET_REPLICAS, default 1)")
    up.set_defaults(func=cmd_up)
