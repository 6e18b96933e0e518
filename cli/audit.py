"""`mcpfleet audit`: check the audit log's chain and export its entries."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import psycopg

from cli.run import on_database
from core import audit
from core.text import escaped


async def verify(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    # The check and the count must describe the same log, appends going on or not.
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        broken = await audit.verify(conn)
        head = await audit.head(conn)
    if broken is not None:
        print(f"audit log broken at entry {broken.id}: {broken.reason}")
        return 1
    assert head is not None
    print(f"audit log intact: {head.last_id} entries")
    # Kept elsewhere, the head's hash also reveals a rewrite of the whole chain.
    print(f"head: entry {head.last_id}, sha256 {head.last_hash.hex()}")
    return 0


def _iso_time(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def export(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    async for entry in audit.entries(conn, tenant=args.tenant, since=args.since):
        if args.json:
            print(_one_line(json.dumps(entry.to_json(), ensure_ascii=False, sort_keys=True)))
        else:
            # Tenants, actors and targets come from clients: escaped, no value can start a field or a line.
            fields = (entry.tenant, entry.actor, entry.action, entry.target, entry.outcome)
            print("\t".join([str(entry.id), audit.canonical_time(entry.at), *(_field(f) for f in fields)]))
    return 0


def _one_line(text: str) -> str:
    """JSON escapes every line break but these three, which many line readers (Python's among them) split at."""
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _field(value: str | None) -> str:
    if value is None:
        return "-"
    return "\\-" if value == "-" else escaped(value)  # a value "-" is not the absent one


def add_commands(sub: argparse._SubParsersAction) -> None:
    commands = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    verify_ = commands.add_parser("verify", help="check the audit log's hash chain; exits 1 at the first broken entry")
    verify_.set_defaults(func=on_database(verify))
    export_ = commands.add_parser("export", help="print audit entries in id order")
    export_.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines), with hashes in hex")
    export_.add_argument("--tenant", help="only this tenant's entries")
    export_.add_argument(
        "--since", type=_iso_time, help="only entries from this ISO 8601 time on (UTC if no zone is given)"
    )
    export_.set_defaults(func=on_database(export))
