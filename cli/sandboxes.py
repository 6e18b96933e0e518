"""`mcpfleet sandboxes`: look at sandboxes, act on one, cap a tenant's.

Acting on a sandbox (hibernate, resume, reclaim) is done by the running gateway, which
holds the sandboxes' channels: the command asks it through the database and waits. With
the kubernetes backend the gateway does it on the user's McpSandbox; listing is kubectl's.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

import psycopg

from cli.run import DatabaseCommand, on_database
from cli.table import add_json_flag, print_rows
from core import accounts
from core.settings import load_settings
from sandbox import requests, tiers
from sandbox.memory import runsc_pss
from sandbox.store import list_sandboxes


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    settings = load_settings()
    if settings.sandbox_backend == "kubernetes":
        # The rows are the local manager's; on kubernetes the McpSandbox objects are the record.
        print(
            "mcpfleet: MCPFLEET_SANDBOX_BACKEND=kubernetes keeps sandboxes as McpSandbox objects, not here:"
            f" kubectl -n {settings.k8s_namespace} get mcpsandboxes",
            file=sys.stderr,
        )
        return 2
    rows = await list_sandboxes(conn, include_ended=args.all)
    # Live PSS of the running ones, where this host runs them (runsc); other backends have no figure here.
    running = [r["id"] for r in rows if r["backend"] == "runsc" and r["state"] == "Running"]
    measured = runsc_pss(settings.home / "runsc", running) if running else {}
    for r in rows:
        r["memory_bytes"] = measured.get(r["id"])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    shown = [
        {"owner": f"{r['tenant']}/{r['user']}" if r["user_id"] is not None else "(warm pool)", "state": r["state"],
         "id": r["id"], "last_used": r["last_used_at"].strftime("%Y-%m-%d %H:%M:%S"),
         "memory": f"{r['memory_bytes'] / 2**20:.0f} MiB" if r["memory_bytes"] else "n/a" if r["backend"] != "runsc" else None,
         "checkpoint": f"{r['checkpoint_bytes'] / 2**20:.0f} MiB" if r["checkpoint_bytes"] else None}
        for r in rows
    ]
    print_rows(args, (("owner", "USER"), ("state", "STATE"), ("id", "SANDBOX"), ("last_used", "LAST USED"),
                      ("memory", "MEMORY (PSS)"), ("checkpoint", "CHECKPOINT")), shown)
    return 0


def _act(action: str) -> DatabaseCommand:
    async def command(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
        user = await accounts.find_user(conn, args.user, tenant=args.tenant)
        request_id = await requests.submit(conn, user.user_id, action, f"cli:{getpass.getuser()}")
        row = await requests.wait(conn, request_id, timeout=args.timeout, pickup_timeout=10.0)
        message = f" ({row['message']})" if row["message"] else ""
        print(f"{action} {user.principal}: {row['outcome']}{message}")
        return 0 if row["outcome"] in ("done", "nothing to do") else 1

    return command


async def cap(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    limit = None if args.max_running < 0 else args.max_running
    await tiers.cap_tenant(conn, args.tenant, limit)
    print(f"tenant {args.tenant}: {'no cap' if limit is None else f'at most {limit} running sandboxes'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sandboxes = sub.add_parser("sandboxes", help="inspect sandboxes and act on them").add_subparsers(
        dest="action", required=True
    )
    ls = sandboxes.add_parser("list", help="list live sandboxes")
    add_json_flag(ls)
    ls.add_argument("--all", action="store_true", help="include reclaimed and failed ones")
    ls.set_defaults(func=on_database(list_))
    for action, text in (
        ("hibernate", "checkpoint a user's running sandbox (memory kept) and stop it"),
        ("resume", "bring a user's sandbox back (from its checkpoint, or started fresh)"),
        ("reclaim", "stop a user's sandbox and drop its checkpoint (the workspace follows the retention policy)"),
    ):
        act = sandboxes.add_parser(action, help=f"{text}; the running gateway does it")
        act.add_argument("user", help="the user whose sandbox it is")
        act.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
        act.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the gateway")
        act.set_defaults(func=on_database(_act(action)))
    cap_ = sandboxes.add_parser("cap", help="limit how many sandboxes of a tenant run at once")
    cap_.add_argument("tenant", help="the tenant to cap")
    cap_.add_argument("--max-running", type=int, required=True, help="at most this many of its sandboxes running at once; -1 removes the cap")
    cap_.set_defaults(func=on_database(cap))
