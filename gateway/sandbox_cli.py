"""`mcpfleet sandboxes …` and `mcpfleet tiers …`: look at sandboxes, act on one, set what they may use.

Acting on a sandbox (hibernate, resume, reclaim) is done by the running gateway, which
holds the sandboxes' channels: the command asks it through the database and waits.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Awaitable, Callable

import psycopg

from core import accounts
from core.settings import load_settings
from sandbox import requests, tiers
from sandbox.store import list_sandboxes
from sandbox.tiers import Tier, TierError

Work = Callable[[psycopg.AsyncConnection], Awaitable[int]]


def _run(work: Work) -> int:
    # gateway.cli imports this module to register the commands; importing it back at the top would be circular.
    from gateway.cli import _run

    async def guarded(conn: psycopg.AsyncConnection) -> int:
        try:
            return await work(conn)
        except (TierError, requests.RequestNotTaken, TimeoutError) as exc:
            print(f"mcpfleet: {exc}", file=sys.stderr)
            return 1

    return _run(load_settings(), guarded)


def cmd_list(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        rows = await list_sandboxes(conn, include_ended=args.all)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        for r in rows:
            owner = f"{r['tenant']}/{r['user']}" if r["user_id"] is not None else "(warm pool)"
            extra = f"\tcheckpoint {r['checkpoint_bytes'] / 2**20:.0f} MiB" if r["checkpoint_bytes"] else ""
            print(f"{owner}\t{r['state']}\t{r['id']}\tlast used {r['last_used_at']:%Y-%m-%d %H:%M:%S}{extra}")
        return 0

    return _run(work)


def _act(action: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        async def work(conn: psycopg.AsyncConnection) -> int:
            user = await accounts.find_user(conn, args.user, tenant=args.tenant)
            request_id = await requests.submit(conn, user.user_id, action, f"cli:{getpass.getuser()}")
            row = await requests.wait(conn, request_id, timeout=args.timeout, pickup_timeout=10.0)
            message = f" ({row['message']})" if row["message"] else ""
            print(f"{action} {user.principal}: {row['outcome']}{message}")
            return 0 if row["outcome"] in ("done", "nothing to do") else 1

        return _run(work)

    return command


def cmd_cap(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        limit = None if args.max_running < 0 else args.max_running
        await tiers.cap_tenant(conn, args.tenant, limit)
        print(f"tenant {args.tenant}: {'no cap' if limit is None else f'at most {limit} running sandboxes'}")
        return 0

    return _run(work)


def cmd_tiers_list(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        rows = await tiers.list_tiers(conn)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print("tier\tcpus\tmemory MB\tpids\tdisk MB\tusers")
        for r in rows:
            print(f"{r['name']}\t{r['cpus']:g}\t{r['memory_mb']}\t{r['pids']}\t{r['disk_mb']}\t{r['users']}")
        return 0

    return _run(work)


def cmd_tiers_set(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
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

    return _run(work)


def cmd_tiers_delete(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        await tiers.delete(conn, args.name)
        print(f"deleted tier {args.name}")
        return 0

    return _run(work)


def cmd_tiers_assign(args: argparse.Namespace) -> int:
    async def work(conn: psycopg.AsyncConnection) -> int:
        user = await accounts.find_user(conn, args.user, tenant=args.tenant)
        await tiers.assign(conn, user.user_id, args.tier)
        print(f"{user.principal} is on tier {args.tier} (from their sandbox's next start)")
        return 0

    return _run(work)


def add_commands(sub: argparse._SubParsersAction) -> None:
    sandboxes = sub.add_parser("sandboxes", help="inspect sandboxes and act on them").add_subparsers(
        dest="action", required=True
    )
    ls = sandboxes.add_parser("list", help="list live sandboxes")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--all", action="store_true", help="include reclaimed and failed ones")
    ls.set_defaults(func=cmd_list)
    for action, text in (
        ("hibernate", "checkpoint a user's running sandbox (memory kept) and stop it"),
        ("resume", "bring a user's sandbox back (from its checkpoint, or started fresh)"),
        ("reclaim", "stop a user's sandbox and drop its checkpoint (the workspace follows the retention policy)"),
    ):
        act = sandboxes.add_parser(action, help=f"{text}; the running gateway does it")
        act.add_argument("user")
        act.add_argument("--tenant", default="default")
        act.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the gateway")
        act.set_defaults(func=_act(action))
    cap = sandboxes.add_parser("cap", help="limit how many sandboxes of a tenant run at once")
    cap.add_argument("tenant")
    cap.add_argument("--max-running", type=int, required=True, help="-1 removes the cap")
    cap.set_defaults(func=cmd_cap)

    tier = sub.add_parser("tiers", help="what a user's sandbox may use").add_subparsers(dest="action", required=True)
    tls = tier.add_parser("list", help="list tiers")
    tls.add_argument("--json", action="store_true")
    tls.set_defaults(func=cmd_tiers_list)
    put = tier.add_parser("set", help="create a tier or change its limits (a new one starts from 'standard')")
    put.add_argument("name")
    put.add_argument("--cpus", type=float)
    put.add_argument("--memory-mb", type=int)
    put.add_argument("--pids", type=int)
    put.add_argument("--disk-mb", type=int, help="the /workspace quota")
    put.set_defaults(func=cmd_tiers_set)
    rm = tier.add_parser("delete", help="delete a tier without users")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_tiers_delete)
    assign = tier.add_parser("assign", help="put a user on a tier")
    assign.add_argument("user")
    assign.add_argument("tier")
    assign.add_argument("--tenant", default="default")
    assign.set_defaults(func=cmd_tiers_assign)
