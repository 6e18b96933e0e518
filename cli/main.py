"""`mcpfleet`: run the fleet and manage its users, keys, sandboxes and registry."""

from __future__ import annotations

import argparse
import logging
import sys

import psycopg

from cli import (
    audit,
    client,
    db,
    doctor,
    groups,
    issuers,
    keys,
    models,
    registry,
    sandboxes,
    secrets,
    tenants,
    tiers,
    tools,
    toolsets,
    up,
    users,
)
from core.errors import FleetError
from core.version import product_version
from mcpfleet_sdk.cli import add_commands as add_sdk_commands

NOUNS = (up, users, keys, sandboxes, tiers, tenants, issuers, db, audit, registry, tools, groups, toolsets, secrets, models, client, doctor)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mcpfleet", description="An MCP server fleet with a gVisor sandbox per user.")
    top.add_argument("--version", action="version", version=f"mcpfleet {product_version()}")
    sub = top.add_subparsers(dest="command", required=True)
    for noun in NOUNS:
        noun.add_commands(sub)
    add_sdk_commands(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (FleetError, TimeoutError) as exc:  # TimeoutError: the gateway did not finish a request in time
        print(f"mcpfleet: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"mcpfleet: cannot reach the database: {exc} (set DATABASE_URL, or MCPFLEET_HOME to the fleet home "
              "whose embedded database to use)", file=sys.stderr)
        return 1
    except psycopg.DataError as exc:  # e.g. a NUL in an argument: PostgreSQL text cannot hold one
        print(f"mcpfleet: the database cannot store that: {exc}", file=sys.stderr)
        return 1
