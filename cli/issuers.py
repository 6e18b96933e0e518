"""`mcpfleet issuers`: the OAuth issuers whose tokens each tenant trusts."""

from __future__ import annotations

import argparse

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core.accounts import AccountError
from gateway.oauth import store


async def add(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    issuer = await store.add_issuer(conn, args.issuer, tenant=args.tenant, jwks_url=args.jwks_url, audience=args.audience)
    print(f"tenant {issuer.tenant} trusts tokens of {issuer.url}")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    issuers = await store.list_issuers(conn)
    rows = [{"issuer": i.url, "tenant": i.tenant, "jwks_url": i.jwks_url, "audience": i.audience} for i in issuers]
    if args.json:
        print_rows(args, (), rows)
        return 0
    shown = [{**r, "jwks_url": r["jwks_url"] or "(discovered)", "audience": r["audience"] or "(public URL)"} for r in rows]
    print_rows(args, (("tenant", "TENANT"), ("issuer", "ISSUER"), ("jwks_url", "KEYS (JWKS)"), ("audience", "AUDIENCE")),
               shown)
    return 0


async def remove(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    if not await store.remove_issuer(conn, args.issuer):
        raise AccountError(f"no trusted issuer {args.issuer!r}")
    print(f"no longer trusting {args.issuer}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    issuers = sub.add_parser("issuers", help="manage the OAuth issuers tenants trust").add_subparsers(
        dest="action", required=True
    )
    add_ = issuers.add_parser("add", help="trust an issuer's tokens for a tenant; its first token for a "
                                          "new subject adds a member user")
    add_.add_argument("--tenant", required=True, help="the tenant whose users the issuer's tokens stand for")
    add_.add_argument("--issuer", required=True, help="the issuer URL, exactly as tokens give it in `iss`")
    add_.add_argument("--jwks-url", help="where its keys are (default: from its OpenID/OAuth metadata)")
    add_.add_argument("--audience", help="the `aud` its tokens carry for us (default: the public MCP URL)")
    add_.set_defaults(func=on_database(add))
    ls = issuers.add_parser("list", help="list trusted issuers")
    add_json_flag(ls)
    ls.set_defaults(func=on_database(list_))
    remove_ = issuers.add_parser("remove", help="stop trusting an issuer (its users stay)")
    remove_.add_argument("issuer", help="the issuer URL, as `mcpfleet issuers list` shows it")
    remove_.set_defaults(func=on_database(remove))
