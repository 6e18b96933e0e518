"""`mcpfleet keys`: create and revoke API keys."""

from __future__ import annotations

import argparse
import sys

import psycopg

from cli.run import on_database
from core import accounts
from core.accounts import AccountError


async def create(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    key = await accounts.create_key(conn, user)
    print(f"API key for {user.principal} (shown once; only its hash is kept):", file=sys.stderr)
    print(key)
    return 0


async def revoke(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    if (args.key is None) == (args.user is None):
        raise AccountError("name either a key (or its prefix) or --user")
    user = await accounts.find_user(conn, args.user, tenant=args.tenant) if args.user else None
    count = await accounts.revoke_keys(conn, key_or_prefix=args.key, user=user)
    if count == 0:
        raise AccountError("no such active key")
    print(f"revoked {count} key{'s' if count != 1 else ''}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create_ = keys.add_parser("create", help="create an API key; prints it alone on the last line")
    create_.add_argument("user")
    create_.add_argument("--tenant", default="default")
    create_.set_defaults(func=on_database(create))
    revoke_ = keys.add_parser("revoke", help="revoke a key (whole or by prefix), or every key of --user")
    revoke_.add_argument("key", nargs="?")
    revoke_.add_argument("--user")
    revoke_.add_argument("--tenant", default="default")
    revoke_.set_defaults(func=on_database(revoke))
