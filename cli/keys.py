"""`mcpfleet keys`: create, list and revoke API keys."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import timedelta

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core import accounts
from core.accounts import AccountError

_DURATION = re.compile(r"^(\d+)([hdw])$")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def duration(text: str) -> timedelta:
    """`30d`, `12h`, `2w`."""
    match = _DURATION.match(text.strip())
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"not a duration like 30d, 12h or 2w: {text!r}")
    return int(match[1]) * _UNITS[match[2]]


async def create(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    key = await accounts.create_key(conn, user, expires_in=args.expires, tool_set=args.set)
    until = f"; it expires in {args.expires}" if args.expires else ""
    until += f"; its clients see only tool set {args.set}" if args.set else ""
    print(f"API key for {user.principal} (shown once; only its hash is kept{until}):", file=sys.stderr)
    print(key)
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant) if args.user else None
    rows = await accounts.list_keys(conn, user=user, tenant=args.tenant if args.user is None and args.tenant_given else None,
                                    include_ended=args.all)
    columns = [("prefix", "PREFIX"), ("tenant", "TENANT"), ("user", "USER"), ("created", "CREATED"),
               ("expires", "EXPIRES"), ("last_used", "LAST USED")]
    if args.all:
        columns.append(("state", "STATE"))
    print_rows(args, columns, rows)
    return 0


async def revoke(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    if (args.key is None) == (args.user is None):
        raise AccountError("name either a key (or its prefix, see `mcpfleet keys list`) or --user")
    user = await accounts.find_user(conn, args.user, tenant=args.tenant) if args.user else None
    count = await accounts.revoke_keys(conn, key_or_prefix=args.key, user=user)
    if count == 0:
        raise AccountError("no such active key (see `mcpfleet keys list`)")
    print(f"revoked {count} key{'s' if count != 1 else ''}")
    return 0


class _TenantGiven(argparse.Action):
    """--tenant that also records it was given (`keys list` shows every tenant by default)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.tenant_given = True


def add_commands(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create_ = keys.add_parser("create", help="create an API key; prints it alone on the last line")
    create_.add_argument("user", help="whose key it is (see `mcpfleet users list`)")
    create_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    create_.add_argument("--expires", type=duration, metavar="DURATION",
                         help="refuse the key after this long, e.g. 30d, 12h or 2w (default: never)")
    create_.add_argument("--set", metavar="NAME",
                         help="bind the key to the user's tool set NAME (see `mcpfleet toolsets`): its clients see only those tools")
    create_.set_defaults(func=on_database(create))
    ls = keys.add_parser("list", help="list keys: prefix, user, created, expires, last used (never the secret)")
    ls.add_argument("--user", help="only this user's keys")
    ls.add_argument("--tenant", default="default", action=_TenantGiven,
                    help="only this tenant's keys (default: every tenant; with --user, the user's tenant, default: default)")
    ls.add_argument("--all", action="store_true", help="also revoked and expired keys, with a STATE column")
    ls.set_defaults(tenant_given=False)
    add_json_flag(ls)
    ls.set_defaults(func=on_database(list_))
    revoke_ = keys.add_parser("revoke", help="revoke a key (whole or by prefix), or every key of --user")
    revoke_.add_argument("key", nargs="?", help="the key, or its prefix as `mcpfleet keys list` shows it")
    revoke_.add_argument("--user", help="revoke every key of this user instead")
    revoke_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    revoke_.set_defaults(func=on_database(revoke))
