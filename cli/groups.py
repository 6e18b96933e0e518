"""`mcpfleet groups`: users' groups (approvals may be bound to one); an operator's command on the
fleet's database, like `mcpfleet users`."""

from __future__ import annotations

import argparse

import psycopg

from cli.run import on_database
from core import accounts


async def set_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    groups = sorted({g.strip() for g in args.groups.split(",") if g.strip()})
    await accounts.set_groups(conn, user, groups)
    print(f"{args.tenant}/{args.user}: {', '.join(groups) or 'no groups'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    groups = sub.add_parser("groups", help="users' groups (approvals may be bound to a group)")
    actions = groups.add_subparsers(dest="action", required=True)
    set_groups = actions.add_parser("set", help="set a user's groups (comma-separated; empty for none)")
    set_groups.add_argument("user", help="the user's name")
    set_groups.add_argument("groups", help="the user's groups, comma-separated (e.g. math,finance); empty for none")
    set_groups.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    set_groups.set_defaults(func=on_database(set_))
