"""`mcpfleet client config CLIENT USER`: a fresh API key for USER and the snippet that connects
that MCP client to this gateway's /mcp with it. The snippet alone goes to stdout (to pipe or
paste), where it goes to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from urllib.parse import urlsplit

import psycopg

from cli.keys import duration
from cli.run import on_database
from core import accounts
from core.endpoint import gateway_url
from core.settings import load_settings

NAME = "mcpfleet"
"""The server's name in the client's configuration."""
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def claude_desktop(url: str, key: str) -> tuple[str, str]:
    """Claude Desktop runs local (stdio) servers from its config file: mcp-remote bridges to HTTP.
    The header goes through an environment variable, as mcp-remote's README advises, because
    some clients mangle arguments with spaces in them."""
    args = ["-y", "mcp-remote", url, "--header", "Authorization:${AUTH_HEADER}"]
    if urlsplit(url).scheme == "http" and urlsplit(url).hostname not in _LOCAL_HOSTS:
        args.append("--allow-http")  # mcp-remote refuses plain HTTP beyond this machine without it
    config = {"mcpServers": {NAME: {"command": "npx", "args": args, "env": {"AUTH_HEADER": f"Bearer {key}"}}}}
    where = ("merge into claude_desktop_config.json (Settings > Developer > Edit Config; "
             "~/Library/Application Support/Claude/ on macOS, %APPDATA%\\Claude\\ on Windows); needs Node's npx")
    return json.dumps(config, indent=2), where


def cursor(url: str, key: str) -> tuple[str, str]:
    config = {"mcpServers": {NAME: {"url": url, "headers": {"Authorization": f"Bearer {key}"}}}}
    return json.dumps(config, indent=2), "merge into ~/.cursor/mcp.json (or .cursor/mcp.json in a project)"


def vscode(url: str, key: str) -> tuple[str, str]:
    config = {"servers": {NAME: {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {key}"}}}}
    return json.dumps(config, indent=2), "merge into .vscode/mcp.json in your workspace (or the user-level mcp.json)"


def claude_code(url: str, key: str) -> tuple[str, str]:
    line = f'claude mcp add --transport http {NAME} {url} --header "Authorization: Bearer {key}"'
    return line, "run this command (add --scope user to have it in every project)"


CLIENTS = {"claude": claude_desktop, "cursor": cursor, "vscode": vscode, "claude-code": claude_code}


async def config(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    url = f"{gateway_url(load_settings(), args.url)}/mcp"
    user = await accounts.find_user(conn, args.user, tenant=args.tenant)
    key = await accounts.create_key(conn, user, expires_in=args.expires)
    snippet, where = CLIENTS[args.client](url, key)
    until = f", expiring in {args.expires}" if args.expires else ""
    print(f"A new API key for {user.principal}{until} is in it (shown once; `mcpfleet keys list` shows its prefix).\n"
          f"For {args.client}: {where}", file=sys.stderr)
    print(snippet)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    client = sub.add_parser("client", help="connect MCP clients to this fleet").add_subparsers(dest="action", required=True)
    config_ = client.add_parser("config", help="create a key for USER and print the client's configuration with it")
    config_.add_argument("client", choices=sorted(CLIENTS), help="Claude Desktop, Cursor, VS Code or Claude Code")
    config_.add_argument("user", help="whose key it is (see `mcpfleet users list`)")
    config_.add_argument("--tenant", default="default", help="the user's tenant (default: default)")
    config_.add_argument("--expires", type=duration, metavar="DURATION",
                         help="refuse the key after this long, e.g. 30d, 12h or 2w (default: never)")
    config_.add_argument("--url", help="the gateway's base URL the client reaches (default: MCPFLEET_URL, else "
                         "MCPFLEET_PUBLIC_URL or where `mcpfleet up` of this fleet home serves)")
    config_.set_defaults(func=on_database(config))
