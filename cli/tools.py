"""`mcpfleet tools`: the tools you may use, through the gateway's API."""

from __future__ import annotations

import argparse

from cli.run import on_api
from mcpfleet_sdk.api import FleetApi


def search(args: argparse.Namespace, api: FleetApi) -> int:
    hits = api.request("GET", "/registry/v1/search", params={"q": args.query, "limit": args.limit}).json()["tools"]
    for hit in hits:
        print(f"{hit['name']}\t{hit['score']:.2f}\t{hit['description']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    tools = sub.add_parser("tools", help="tools you may use").add_subparsers(dest="action", required=True)
    search_ = tools.add_parser("search", help="find approved tools by meaning, best first")
    search_.add_argument("query")
    search_.add_argument("--limit", type=int, default=10)
    search_.set_defaults(func=on_api(search))
