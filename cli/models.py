"""`mcpfleet models`: the fleet's model providers, their state, and what each user asked of them."""

from __future__ import annotations

import argparse
import asyncio
import os

import psycopg

from cli.run import on_database
from cli.table import add_json_flag, print_rows
from core.models import usage
from core.models.factory import providers_from_env
from core.models.local import LocalProvider, running_state
from core.settings import load_settings
from core.vault import open_secrets


async def _list() -> list[dict[str, object]]:
    """As the running fleet sees them: hosted providers asked now, the local model's state from the fleet's home."""
    home = load_settings().home
    model_key = None
    if os.environ.get("MCPFLEET_MODEL_URL"):  # a hosted API's key, as the gateway reads it: Vault first
        with open_secrets(home) as store:
            model_key = await store.fleet_value("MCPFLEET_MODEL_KEY")
    providers = providers_from_env(home / "models", model_key=model_key)
    rows: list[dict[str, object]] = []
    default = os.environ.get("MCPFLEET_MODEL", "").strip() or None
    for provider in providers:
        if isinstance(provider, LocalProvider):
            state, detail = running_state(provider.state_file)
        else:
            state, detail = provider.state, ""
        names = await provider.models()
        detail = detail or provider.detail
        if not names and provider.detail:
            state = "failed"
        for name in names or [""]:
            rows.append({"provider": provider.name, "model": name, "state": state, "detail": detail, "default": False})
        await provider.close()
    # As the router picks it: MCPFLEET_MODEL, else the first ready provider's first model.
    for row in rows:
        named = default in (row["model"], f"{row['provider']}/{row['model']}")
        if named or (default is None and row["state"] == "ready" and row["model"]):
            row["default"] = True
            break
    return rows


def list_(args: argparse.Namespace) -> int:
    rows = asyncio.run(_list())
    print_rows(args, (("provider", "PROVIDER"), ("model", "MODEL"), ("state", "STATE"), ("default", "DEFAULT"),
                      ("detail", "DETAIL")), rows)
    return 0


async def usage_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    rows = await usage.usage(conn, days=args.days, tenant=args.tenant)
    print_rows(args, (("day", "DAY"), ("tenant", "TENANT"), ("user", "USER"), ("server", "SERVER"), ("purpose", "PURPOSE"),
                      ("model", "MODEL"), ("asks", "ASKS"), ("tokens_in", "TOKENS IN"), ("tokens_out", "TOKENS OUT"),
                      ("mean_latency_ms", "MEAN MS")), rows)
    return 0


async def quota(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    tokens = None if args.tokens == "none" else int(args.tokens)
    await usage.set_quota(conn, tokens_per_day=tokens, tenant=args.tenant, tier=args.tier)
    whose = f"tenant {args.tenant}" if args.tenant else f"users on tier {args.tier} (each)"
    fallback = "MCPFLEET_MODEL_TENANT_TOKENS_PER_DAY" if args.tenant else "MCPFLEET_MODEL_TOKENS_PER_DAY"
    print(f"{whose}: {tokens} model tokens a day" if tokens is not None else f"{whose}: the quota of {fallback}, if set")
    return 0


def _tokens(raw: str) -> str:
    if raw != "none" and not (raw.isdigit()):
        raise argparse.ArgumentTypeError("a number of tokens, or 'none'")
    return raw


def add_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the fleet's models: providers, state, usage").add_subparsers(dest="action", required=True)
    ls = models.add_parser("list", help="providers and their models, each model's state, and which is the default")
    add_json_flag(ls)
    ls.set_defaults(func=list_)
    used = models.add_parser("usage", help="asks and tokens per day, tenant, user, server, purpose and model")
    used.add_argument("--days", type=int, default=1, help="this many UTC days back, today included (default: 1, today)")
    used.add_argument("--tenant", help="only this tenant's")
    add_json_flag(used)
    used.set_defaults(func=on_database(usage_))
    limit = models.add_parser("quota", help="model tokens a day for a tenant, or for each user of a tier (reset 00:00 UTC)")
    whose = limit.add_mutually_exclusive_group(required=True)
    whose.add_argument("--tenant", help="the tenant's tokens a day, all its users together")
    whose.add_argument("--tier", help="each user's tokens a day, for the users on this tier")
    limit.add_argument("tokens", type=_tokens, help="tokens (in and out) a day, or 'none' for the environment's quota")
    limit.set_defaults(func=on_database(quota))
