"""`mcpfleet tiers`: what a user's sandbox may use."""

from __future__ import annotations

import argparse
import json

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core import accounts
from sandbox import tiers
from sandbox.tiers import Tier, TierError


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    rows = await tiers.list_tiers(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [{**r, "cpus": f"{r['cpus']:g}"} for r in rows]
    print_rows(args, (("name", "TIER"), ("cpus", "CPUS"), ("memory_mb", "MEMORY MB"), ("pids", "PIDS"),
                      ("disk_mb", "DISK MB"), ("users", "USERS")), shown)
    return 0


async def set_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    try:
        current = await tiers.get(conn, args.name)
    except TierError:
        current = await tiers.get(conn, tiers.DEFAULT_TIER)  # a new tier starts from the default's values
    tier = Tier(
        args.name,
        args.cpus if args.cpus is not None else current.cpus,
        args.memory_mb if args.memory_mb is not None else current.memory_mb,
        args.pids if args.pids is not None else current.pids,
        args.disk_mb if args.disk_mb is not None else current.disk_mb,
    )
    await tiers.put(conn, tier)
    print(f"tier {tier.name}: {tier.cpus:g} CPU, {tier.memory_mb} MB memory, {tier.pids} pids, {tier.disk_mb} MB disk")
    return 0


async def delete(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    await tiers.delete(conn, args.name)
    print(f"deleted tier {args.name}")
    return 0


async def assign(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    await tiers.assign(conn, user.user_id, args.tier)
    print(f"{user.principal} is on tier {args.tier} (from their sandbox's next start)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    tier = sub.add_parser("tiers", help="what a user's sandbox may use").add_subparsers(dest="action", required=True)
    ls = tier.add_parser("list", help="list tiers")
    add_json_flag(ls)
    ls.set_defaults(func=on_database(list_))
    put = tier.add_parser("set", help="create a tier or change its limits (a new one starts from 'standard')")
    put.add_argument("name", help="the tier's name")
    put.add_argument("--cpus", type=float, help="CPUs its sandboxes may use (e.g. 0.5)")
    put.add_argument("--memory-mb", type=int, help="memory of its sandboxes, in MB")
    put.add_argument("--pids", type=int, help="processes and threads a sandbox may have at once")
    put.add_argument("--disk-mb", type=int, help="the /workspace quota")
    put.set_defaults(func=on_database(set_))
    rm = tier.add_parser("delete", help="delete a tier without users")
    rm.add_argument("name", help="the tier's name")
    rm.set_defaults(func=on_database(delete))
    assign_ = tier.add_parser("assign", help="put a user on a tier")
    assign_.add_argument("user", help="the user's name")
    assign_.add_argument("tier", help="the tier's name (see `mcpfleet tiers list`)")
    assign_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    assign_.set_defaults(func=on_database(assign))
