"""`mcpfleet tenants` and `mcpfleet issuers`: the tenants, and the OAuth issuers each one trusts."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable

import psycopg

from core.accounts import AccountError
from core.db import migrate, resolve_database_url
from core.settings import load_settings
from gateway.oauth import store


def _run(work: Callable[[psycopg.AsyncConnection], Awaitable[int]]) -> int:
    url = resolve_database_url(load_settings())
    migrate(url)

    async def main() -> int:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            return await work(conn)

    return asyncio.run(main())


def cmd_tenants_add(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        try:
            cur = await conn.execute("INSERT INTO tenants (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (args.name,))
        except psycopg.errors.CheckViolation:
            raise AccountError(f"invalid tenant name {args.name!r}: use lower-case letters, digits, '.', '_' or '-'") from None
        if cur.rowcount == 0:
            raise AccountError(f"tenant {args.name!r} already exists")
        print(f"added tenant {args.name}")
        return 0

    return _run(work)


def cmd_tenants_list(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        for (name,) in await (await conn.execute("SELECT name FROM tenants ORDER BY name")).fetchall():
            print(name)
        return 0

    return _run(work)


def cmd_issuers_add(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        issuer = await store.add_issuer(conn, args.issuer, tenant=args.tenant, jwks_url=args.jwks_url,
                                        audience=args.audience)
        print(f"tenant {issuer.tenant} trusts tokens of {issuer.url}")
        return 0

    return _run(work)


def cmd_issuers_list(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        issuers = await store.list_issuers(conn)
        if args.json:
            print(json.dumps([{"issuer": i.url, "tenant": i.tenant, "jwks_url": i.jwks_url, "audience": i.audience}
                              for i in issuers], indent=2))
        else:
            for i in issuers:
                print(f"{i.tenant}\t{i.url}\t{i.jwks_url or '(discovered)'}\t{i.audience or '(public URL)'}")
        return 0

    return _run(work)


def cmd_issuers_remove(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        if not await store.remove_issuer(conn, args.issuer):
            raise AccountError(f"no trusted issuer {args.issuer!r}")
        print(f"no longer trusting {args.issuer}")
        return 0

    return _run(work)


def add_commands(sub: argparse._SubParsersAction) -> None:
    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    add = tenants.add_parser("add", help="add a tenant")
    add.add_argument("name")
    add.set_defaults(func=cmd_tenants_add)
    tenants.add_parser("list", help="list tenants").set_defaults(func=cmd_tenants_list)

    issuers = sub.add_parser("issuers", help="manage the OAuth issuers tenants trust").add_subparsers(
        dest="action", required=True
    )
    add = issuers.add_parser("add", help="trust an issuer's tokens for a tenant; its first token for a "
                                         "new subject adds a member user")
    add.add_argument("--tenant", required=True)
    add.add_argument("--issuer", required=True, help="the issuer URL, exactly as tokens give it in `iss`")
    add.add_argument("--jwks-url", help="where its keys are (default: from its OpenID/OAuth metadata)")
    add.add_argument("--audience", help="the `aud` its tokens carry for us (default: the public MCP URL)")
    add.set_defaults(func=cmd_issuers_add)
    ls = issuers.add_parser("list", help="list trusted issuers")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_issuers_list)
    remove = issuers.add_parser("remove", help="stop trusting an issuer (its users stay)")
    remove.add_argument("issuer")
    remove.set_defaults(func=cmd_issuers_remove)
