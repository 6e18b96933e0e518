"""`mcpfleet issuers`: the OAuth issuers whose tokens each tenant trusts."""

from __future__ import annotations

import argparse
import json

import psycopg

from cli.run import on_database
from core.accounts import AccountError
from gateway.oauth import store


async def add(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    issuer = await store.add_issuer(conn, args.issuer, tenant=args.tenant, jwks_url=args.jwks_url, audience=args.audience)
    print(f"tenant {issuer.tenant} trusts tokens of {issuer.url}")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    issuers = await store.list_issuers(conn)
    if args.json:
        print(json.dumps([{"issuer": i.url, "tenant": i.tenant, "jwks_url": i.jwks_url, "audience": i.audience}
                          for i in issuers], indent=2))
    else:
        for i in issuers:
            print(f"{i.tenant}\t{i.url}\t{i.jwks_url or '(discovered)'}\t{i.audience or '(public URL)'}")
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
    add_.add_argument("--tenant", required=True)
    add_.add_argument("--issuer", required=True, help="the issuer URL, exactly as tokens give it in `iss`")
    add_.add_argument("--jwks-url", help="where its keys are (default: from its OpenID/OAuth metadata)")
    add_.add_argument("--audience", help="the `aud` its tokens carry for us (default: the public MCP URL)")
    add_.set_defaults(func=on_database(add))
    ls = issuers.add_parser("list", help="list trusted issuers")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=on_database(list_))
    remove_ = issuers.add_parser("remove", help="stop trusting an issuer (its users stay)")
    remove_.add_argument("issuer")
    remove_.set_defaults(func=on_database(remove))
