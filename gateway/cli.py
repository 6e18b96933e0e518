"""`mcpfleet`: run the fleet and manage its users, keys and sandboxes."""

from __future__ import annotations

import argparse
import getpass
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable

import psycopg

from core import accounts
from core.accounts import AccountError
from core.db import migrate, resolve_database_url
from core.settings import Settings, load_settings
from gateway import audit_cli, sandbox_cli
from gateway import registry_cli
from gateway.issuers_cli import add_commands as add_issuer_commands
from mcpfleet_sdk.cli import add_commands as add_sdk_commands


def _database(settings: Settings) -> str:
    url = resolve_database_url(settings)
    migrate(url)
    return url


def _run(settings: Settings, work: Callable[[psycopg.AsyncConnection], Awaitable[int]]) -> int:
    url = _database(settings)

    async def main() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await work(conn)

    return asyncio.run(main())


def cmd_up(args: argparse.Namespace) -> int:
    from gateway.serve import serve

    settings = load_settings(host=args.host, port=args.port)
    return serve(settings)


def cmd_users_add(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        user = await accounts.add_user(conn, args.name, tenant=args.tenant, role=args.role)
        print(f"added {user.principal} ({user.role})")
        return 0

    return _run(load_settings(), work)


def cmd_users_role(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        user = await accounts.set_role(conn, args.name, args.role, tenant=args.tenant, actor=getpass.getuser())
        print(f"{user.principal} is now {user.role}")
        return 0

    return _run(load_settings(), work)


def cmd_users_list(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        users = await accounts.list_users(conn)
        if args.json:
            print(json.dumps([{"user": u.user, "tenant": u.tenant, "role": u.role} for u in users], indent=2))
        else:
            for u in users:
                print(f"{u.principal}\t{u.role}")
        return 0

    return _run(load_settings(), work)


def cmd_keys_create(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        user = await accounts.find_user(conn, args.user, tenant=args.tenant)
        key = await accounts.create_key(conn, user)
        print(f"API key for {user.principal} (shown once; only its hash is kept):", file=sys.stderr)
        print(key)
        return 0

    return _run(load_settings(), work)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    if (args.key is None) == (args.user is None):
        raise AccountError("name either a key (or its prefix) or --user")

    async def work(conn: psycopg.AsyncConnection) -> int:
        user = await accounts.find_user(conn, args.user, tenant=args.tenant) if args.user else None
        count = await accounts.revoke_keys(conn, key_or_prefix=args.key, user=user)
        if count == 0:
            raise AccountError("no such active key")
        print(f"revoked {count} key{'s' if count != 1 else ''}")
        return 0

    return _run(load_settings(), work)


def cmd_db_url(args: argparse.Namespace) -> int:
    settings = load_settings()
    # The embedded server is left running so that the printed URL can be used.
    url = resolve_database_url(settings, keep_running=True)
    migrate(url)
    print(url)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mcpfleet", description="An MCP server fleet with a gVisor sandbox per user.")
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="serve the fleet (MCP at /mcp)")
    up.add_argument("--host", help="address to listen on (MCPFLEET_HOST, default 127.0.0.1)")
    up.add_argument("--port", type=int, help="port to listen on (MCPFLEET_PORT, default 8080)")
    up.set_defaults(func=cmd_up)

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    add = users.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--tenant", default="default")
    add.add_argument("--role", default="member", choices=accounts.ROLES)
    add.set_defaults(func=cmd_users_add)
    role = users.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=accounts.ROLES)
    role.add_argument("--tenant", default="default")
    role.set_defaults(func=cmd_users_role)
    ls = users.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_users_list)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create an API key; prints it alone on the last line")
    create.add_argument("user")
    create.add_argument("--tenant", default="default")
    create.set_defaults(func=cmd_keys_create)
    revoke = keys.add_parser("revoke", help="revoke a key (whole or by prefix), or every key of --user")
    revoke.add_argument("key", nargs="?")
    revoke.add_argument("--user")
    revoke.add_argument("--tenant", default="default")
    revoke.set_defaults(func=cmd_keys_revoke)

    sandbox_cli.add_commands(sub)

    add_issuer_commands(sub)

    db = sub.add_parser("db", help="the fleet's database").add_subparsers(dest="action", required=True)
    url = db.add_parser("url", help="print a libpq URL to the fleet's database")
    url.set_defaults(func=cmd_db_url)
    audit_cli.add_commands(sub)
    add_sdk_commands(sub)
    registry_cli.add_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except AccountError as exc:
        print(f"mcpfleet: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"mcpfleet: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except psycopg.DataError as exc:  # e.g. a NUL in an argument: PostgreSQL text cannot hold one
        print(f"mcpfleet: the database cannot store that: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
