"""`mcpfleet db`: the fleet's database."""

from __future__ import annotations

import argparse

from cli.run import database_url


def cmd_url(args: argparse.Namespace) -> int:
    # The embedded server is left running so that the printed URL can be used.
    print(database_url(keep_running=True))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="the fleet's database").add_subparsers(dest="action", required=True)
    db.add_parser("url", help="print a libpq URL to the fleet's database").set_defaults(func=cmd_url)
