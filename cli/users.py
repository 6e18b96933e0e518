"""`mcpfleet users`: add, list and remove users, change their roles."""

from __future__ import annotations

import argparse
import getpass

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core import accounts
from core.accounts import AccountError
from sandbox import requests
from sandbox.store import list_sandboxes


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
    rows = [{"user": u.user, "tenant": u.tenant, "role": u.role} for u in users]
    print_rows(args, (("user", "USER"), ("tenant", "TENANT"), ("role", "ROLE")), rows)
    return 0


async def remove(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    actor = f"cli:{getpass.getuser()}"
    user = await accounts.find_user(conn, args.name, tenant=args.tenant)
    # Keys first: nothing the user does from now on starts a new sandbox.
    revoked = await accounts.revoke_keys(conn, user=user, actor=actor)
    live = [s for s in await list_sandboxes(conn) if s["user_id"] == user.user_id]
    if live:
        # The running gateway holds the sandbox: it stops it, drops its checkpoint, and keeps or
        # deletes the workspace as MCPFLEET_WORKSPACE_RETENTION says.
        request_id = await requests.submit(conn, user.user_id, "reclaim", actor)
        row = await requests.wait(conn, request_id, timeout=args.timeout, pickup_timeout=10.0)
        if row["outcome"] not in ("done", "nothing to do"):
            raise AccountError(f"could not reclaim the sandbox of {user.principal}: {row['message'] or row['outcome']}"
                               f" (its keys are revoked; run this again once the gateway can reclaim it)")
    await accounts.remove_user(conn, user, actor=actor)
    sandbox = "its sandbox reclaimed" if live else "no sandbox was running"
    print(f"removed {user.principal}: {revoked} key{'s' if revoked != 1 else ''} revoked, {sandbox}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    add_ = users.add_parser("add", help="add a user")
    add_.add_argument("name", help="the user's name (letters, digits, '.', '_', '@', '-')")
    add_.add_argument("--tenant", default="default", help="the user's tenant, made if new (default: default)")
    add_.add_argument("--role", default="member", choices=accounts.ROLES,
                      help="what the user may do: admin, publisher, member (default) or auditor")
    add_.set_defaults(func=on_database(add))
    role_ = users.add_parser("role", help="change a user's role")
    role_.add_argument("name", help="the user's name")
    role_.add_argument("role", choices=accounts.ROLES, help="the new role: admin, publisher, member or auditor")
    role_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    role_.set_defaults(func=on_database(role))
    ls = users.add_parser("list", help="list users")
    add_json_flag(ls)
    ls.set_defaults(func=on_database(list_))
    remove_ = users.add_parser(
        "remove", help="remove a user: their keys revoked, their sandbox reclaimed (the workspace kept or deleted "
                       "as MCPFLEET_WORKSPACE_RETENTION says); needs the gateway running if they have a sandbox"
    )
    remove_.add_argument("name", help="the user's name")
    remove_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    remove_.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the gateway to reclaim the sandbox")
    remove_.set_defaults(func=on_database(remove))
