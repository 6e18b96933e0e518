"""`mcpfleet tenants`: the tenants users, issuers and caps belong to."""

from __future__ import annotations

import argparse

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core import accounts


async def add(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    await accounts.add_tenant(conn, args.name, conformance=args.with_conformance)
    print(f"added tenant {args.name}" + (" (with the conformance fixture server)" if args.with_conformance else ""))
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    rows = await accounts.list_tenants(conn)
    print_rows(args, (("tenant", "TENANT"), ("users", "USERS"), ("conformance", "CONFORMANCE")), rows)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    add_ = tenants.add_parser("add", help="add a tenant")
    add_.add_argument("name", help="the tenant's name (lower-case letters, digits, '.', '_', '-')")
    add_.add_argument(
        "--with-conformance", action="store_true",
        help="also give its users the MCP conformance fixture server (io.mcpfleet/conformance, 28 test tools); "
             "off by default: it is a test fixture, not a product tool",
    )
    add_.set_defaults(func=on_database(add))
    ls = tenants.add_parser("list", help="list tenants")
    add_json_flag(ls)
    ls.set_defaults(func=on_database(list_))
