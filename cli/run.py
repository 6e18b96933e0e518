"""How a command runs: on the fleet's database, migrated first, or through the gateway's API."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

import psycopg

from core.db import migrate, resolve_database_url
from core.settings import load_settings
from mcpfleet_sdk.api import FleetApi, FleetApiError, add_api_flags

Command = Callable[[argparse.Namespace], int]
DatabaseCommand = Callable[[argparse.Namespace, psycopg.AsyncConnection], Awaitable[int]]
ApiCommand = Callable[[argparse.Namespace, FleetApi], int]


def database_url(*, keep_running: bool = False) -> str:
    """The fleet's database (the embedded server started if need be), its schema up to date."""
    url = resolve_database_url(load_settings(), keep_running=keep_running)
    migrate(url)
    return url


def on_database(command: DatabaseCommand) -> Command:
    """`command(args, conn)` on one autocommit connection to the fleet's database."""

    def run(args: argparse.Namespace) -> int:
        url = database_url()

        async def main() -> int:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                return await command(args, conn)

        return asyncio.run(main())

    return run


def on_api(command: ApiCommand) -> Command:
    """`command(args, api)` against the gateway (`--url`/`--key`, MCPFLEET_URL/MCPFLEET_KEY, or the fleet
    home's gateway); its refusals exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            with FleetApi.for_fleet(getattr(args, "url", None), getattr(args, "key", None)) as api:
                return command(args, api)
        except FleetApiError as exc:
            print(f"mcpfleet: {exc}", file=sys.stderr)
            return 2

    return run


def api_command(parser: argparse.ArgumentParser, command: ApiCommand) -> None:
    """`parser` runs `command` through the gateway's API, with `--url` and `--key`."""
    add_api_flags(parser)
    parser.set_defaults(func=on_api(command))
