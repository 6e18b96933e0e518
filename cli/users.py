"""`mcpfleet users`: add users, change their roles, list them."""

from __future__ import annotations

import argparse
import getpass
import json

import psycopg

from cli.run import on_database
from core import accounts


async def add(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.add_user(conn, args.name, tenant=args.tenant, role=args.role)
    print(f"added {user.principal} ({user.role})")
    return 0


async def role(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.set_role(conn, args.name, args.role, tenant=args.tenant, actor=getpass.getuser())
    print(f"{user.principal} is now {user.role}")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    users = await accounts.list_users(conn)
    if args.json:
        print(json.dumps([{"user": u.user, "tenant": u.tenant, "role": u.role} for u in users], indent=2))
    else:
        for u in users:
            print(f"{u.principal}\t{u.role}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    add_ = users.add_parser("add", help="add a user")
    add_.add_argument("name")
    add_.add_argument("--tenant", default="default")
    add_.add_argument("--role", default="member", choices=accounts.ROLES)
    add_.set_defaults(func=on_database(add))
    role_ = users.add_parser("role", help="change a user's role")
    role_.add_argument("name")
    role_.add_argument("role", choices=accounts.ROLES)
    role_.add_argument("--tenant", default="default")
    role_.set_defaults(func=on_database(role))
    ls = users.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=on_database(list_))
