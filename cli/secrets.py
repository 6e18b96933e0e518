"""`mcpfleet secrets`: the values tool servers get as environment variables, kept in Vault.

    mcpfleet secrets set alice io.example/github GITHUB_TOKEN       # the value from stdin or a prompt
    mcpfleet secrets set --tenant acme io.example/jira JIRA_TOKEN   # tenant-wide: every user's fallback
    mcpfleet secrets list alice                                     # names, servers, versions, dates
    mcpfleet secrets rm alice io.example/github GITHUB_TOKEN
    mcpfleet secrets set --fleet MCPFLEET_MODEL_KEY                 # the fleet's own: a hosted model API's key

A user is `NAME` (tenant "default") or `TENANT/NAME`. `set` refuses a NAME that no approved server
of the tenant declares for SERVER, naming what they declare; `--force` sets it ahead of an approval. A value is never taken from the command
line (it would stay in the shell's history and in every process listing) and never printed.
The Vault is the one the fleet uses: VAULT_ADDR's, else the fleet home's OpenBao (attached to if
the gateway runs it, else started for the command).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

import psycopg

from cli.run import on_database
from core import accounts, audit
from core.settings import load_settings
from core.vault import FLEET_SECRETS, SecretError, open_secrets, remove_secret, set_secret
from registry.secret_names import UndeclaredSecret, check_declared


def _user(text: str) -> tuple[str, str]:
    tenant, _, name = text.rpartition("/")
    return tenant or "default", name


async def _owner(args: argparse.Namespace, conn: psycopg.AsyncConnection, rest: int) -> tuple[str, str | None, list[str]]:
    """(tenant, user or None for tenant-wide, the remaining `rest` positionals)."""
    if args.tenant is not None:
        if len(args.args) != rest:
            raise SecretError(f"with --tenant give {rest} more arguments: SERVER NAME" if rest == 2 else "no USER with --tenant")
        if args.tenant not in {row["tenant"] for row in await accounts.list_tenants(conn)}:
            raise SecretError(f"no tenant {args.tenant!r}")
        return args.tenant, None, args.args
    if len(args.args) != rest + 1:
        raise SecretError("give USER SERVER NAME (or --tenant TENANT SERVER NAME)" if rest == 2 else "give USER (or --tenant TENANT)")
    tenant, name = _user(args.args[0])
    user = await accounts.find_user(conn, name, tenant=tenant)
    return user.tenant, user.user, args.args[1:]


def _read_value(name: str) -> str:
    if sys.stdin.isatty():
        value = getpass.getpass(f"value of {name} (not shown): ")
    else:
        value = sys.stdin.read()
        # One trailing newline is the shell's (`echo`, a here-string), not the value's.
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    if not value:
        raise SecretError(f"no value given for {name} (on stdin or at the prompt)")
    return value


def _fleet_name(args: argparse.Namespace) -> str:
    if args.tenant is not None or len(args.args) != 1:
        raise SecretError(f"with --fleet give only the secret's NAME ({', '.join(FLEET_SECRETS)})")
    return str(args.args[0])


async def _fleet_set(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    name = _fleet_name(args)
    with open_secrets(load_settings().home) as store:
        version = await store.put_fleet(name, _read_value(name))
    await audit.append(conn, action="secret.set", outcome="ok", actor=getpass.getuser(), target="fleet",
                       detail={"name": name, "version": version})
    print(f"{name} of the fleet: version {version} (gateways read it when they start)")
    return 0


async def _fleet_rm(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    name = _fleet_name(args)
    with open_secrets(load_settings().home) as store:
        if not await store.delete_fleet(name):
            raise SecretError(f"the fleet has no secret {name}")
    await audit.append(conn, action="secret.remove", outcome="ok", actor=getpass.getuser(), target="fleet", detail={"name": name})
    print(f"removed the fleet's {name}")
    return 0


async def set_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    if args.fleet:
        return await _fleet_set(args, conn)
    tenant, user, (server, name) = await _owner(args, conn, 2)
    if not args.force:
        try:
            await check_declared(conn, tenant, server, name)
        except UndeclaredSecret as exc:
            raise SecretError(str(exc).replace(" (API: ?force=1)", "")) from None
    value = _read_value(name)
    with open_secrets(load_settings().home) as store:
        version = await set_secret(store, conn, actor=getpass.getuser(), tenant=tenant, user=user, server=server, name=name, value=value)
    whose = f"{tenant}/{user}" if user else f"tenant {tenant}"
    print(f"{name} for {server} of {whose}: version {version} (the server restarts with it at its next call)")
    return 0


async def list_(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    tenant, user, _ = await _owner(args, conn, 0)
    with open_secrets(load_settings().home) as store:
        found = await store.list_secrets(tenant, user)
    if args.json:
        print(json.dumps([s.as_dict() for s in found], indent=2))
        return 0
    print("server\tname\tversion\tupdated")
    for s in found:
        print(f"{s.server}\t{s.name}\t{s.version}\t{s.updated_at}")
    return 0


async def rm(args: argparse.Namespace, conn: psycopg.AsyncConnection) -> int:
    if args.fleet:
        return await _fleet_rm(args, conn)
    tenant, user, (server, name) = await _owner(args, conn, 2)
    with open_secrets(load_settings().home) as store:
        removed = await remove_secret(store, conn, actor=getpass.getuser(), tenant=tenant, user=user, server=server, name=name)
    if not removed:
        raise SecretError(f"no secret {name} for {server} of {tenant}/{user}" if user else f"no tenant-wide secret {name} for {server}")
    print(f"removed {name} for {server}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    secrets = sub.add_parser("secrets", help="secrets tool servers get (kept in Vault; values never shown)")
    actions = secrets.add_subparsers(dest="action", required=True)
    put = actions.add_parser("set", help="set or rotate a secret: USER SERVER NAME, or --tenant T SERVER NAME; the value on stdin")
    put.add_argument("args", nargs="+", metavar="[USER] SERVER NAME",
                     help="the user (TENANT/USER, or USER of the default tenant; left out with --tenant), the server (namespace/name), the secret's NAME")
    put.add_argument("--tenant", help="tenant-wide: the value every user of the tenant falls back to")
    put.add_argument("--fleet", action="store_true",
                     help=f"one of the fleet's own secrets, given as NAME alone ({', '.join(FLEET_SECRETS)})")
    put.add_argument("--force", action="store_true",
                     help="set it even if no approved server of the tenant declares NAME for SERVER (ahead of an approval)")
    put.set_defaults(func=on_database(set_))
    ls = actions.add_parser("list", help="a user's secrets (or --tenant T's): names, servers, versions, dates")
    ls.add_argument("args", nargs="*", metavar="USER", help="whose secrets: TENANT/USER, or USER of the default tenant (none with --tenant)")
    ls.add_argument("--tenant", help="list that tenant's tenant-wide secrets instead of a user's")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=on_database(list_))
    remove = actions.add_parser("rm", help="remove a secret (all its versions)")
    remove.add_argument("args", nargs="+", metavar="[USER] SERVER NAME", help="as for set: [USER] SERVER NAME")
    remove.add_argument("--tenant", help="remove the tenant-wide secret of that tenant")
    remove.add_argument("--fleet", action="store_true", help="remove one of the fleet's own secrets: NAME alone")
    remove.set_defaults(func=on_database(rm))
