"""`mcpfleet toolsets`: a user's named tool sets. A client connecting with `/mcp?set=NAME`, or with a
key made by `mcpfleet keys create USER --set NAME`, sees only the set's tools among those approved
for the user; an operator's command on the fleet's database, like `mcpfleet users`."""

from __future__ import annotations

import argparse

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core import accounts, tool_sets


async def set_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    tools = [t for part in args.tools for t in part.split(",")]
    await tool_sets.set_tool_set(conn, user, args.name, tools)
    print(f"{user.principal}: tool set {args.name} = {', '.join(dict.fromkeys(t.strip() for t in tools if t.strip()))}")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    rows = await tool_sets.list_tool_sets(conn, user)
    if not args.json:
        rows = [{**row, "tools": ",".join(row["tools"])} for row in rows]
    print_rows(args, [("name", "SET"), ("keys", "KEYS"), ("updated", "UPDATED"), ("tools", "TOOLS")], rows)
    return 0


async def remove(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    await tool_sets.remove_tool_set(conn, user, args.name)
    print(f"{user.principal}: removed tool set {args.name} (keys bound to it are refused from now on)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sets = sub.add_parser("toolsets", help="named sets of a user's tools, for clients that should see only some")
    actions = sets.add_subparsers(dest="action", required=True)
    set_cmd = actions.add_parser("set", help="create or replace a user's tool set")
    set_cmd.add_argument("user", help="whose set it is (see `mcpfleet users list`)")
    set_cmd.add_argument("name", help="the set's name, used as /mcp?set=NAME (lower-case letters, digits, '.', '_', '-')")
    set_cmd.add_argument("tools", nargs="+", metavar="TOOL[,TOOL...]",
                         help="public tool names (server__tool) or server__* for all of a server's; a set never "
                              "grants a tool not approved for the user")
    list_cmd = actions.add_parser("list", help="list a user's tool sets: name, keys bound to it, tools")
    list_cmd.add_argument("user", help="whose sets to list")
    add_json_flag(list_cmd)
    rm = actions.add_parser("rm", help="remove a user's tool set (keys bound to it are refused, never widened)")
    rm.add_argument("user", help="whose set it is")
    rm.add_argument("name", help="the set's name (see `mcpfleet toolsets list USER`)")
    for parser, func in ((set_cmd, set_), (list_cmd, list_), (rm, remove)):
        parser.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
        parser.set_defaults(func=on_database(func))
