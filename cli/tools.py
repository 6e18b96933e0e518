"""`mcpfleet tools`: the tools you may use, through the gateway's API."""

from __future__ import annotations

import argparse

from cli.run import api_command
from cli.table import add_json_flag, print_rows
from mcpfleet_sdk.api import FleetApi


def search(args: argparse.Namespace, api: FleetApi) -> int:
    hits = api.request("GET", "/registry/v1/search", params={"q": args.query, "limit": args.limit}).json()["tools"]
    if args.json:
        print_rows(args, (), hits)
        return 0
    shown = [{**hit, "score": f"{hit['score']:.2f}", "description": " ".join(str(hit["description"] or "").split())}
             for hit in hits]
    print_rows(args, (("name", "TOOL"), ("score", "SCORE"), ("description", "DESCRIPTION")), shown)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    tools = sub.add_parser("tools", help="tools you may use").add_subparsers(dest="action", required=True)
    search_ = tools.add_parser("search", help="find approved tools by meaning, best first")
    search_.add_argument("query", help="what you want to do, in words")
    search_.add_argument("--limit", type=int, default=10, help="at most this many tools (default 10)")
    add_json_flag(search_)
    api_command(search_, search)
