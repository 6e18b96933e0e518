"""`mcpfleet tenants`: the tenants users, issuers and caps belong to."""

from __future__ import annotations

import argparse

import psycopg

from cli.run import on_database
from core import accounts


async def add(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    await accounts.add_tenant(conn, args.name)
    print(f"added tenant {args.name}")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    for name in await accounts.list_tenants(conn):
        print(name)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    add_ = tenants.add_parser("add", help="add a tenant")
    add_.add_argument("name")
    add_.set_defaults(func=on_database(add))
    tenants.add_parser("list", help="list tenants").set_defaults(func=on_database(list_))
