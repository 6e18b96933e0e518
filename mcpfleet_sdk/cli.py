"""`mcpfleet init`, `mcpfleet dev` and `mcpfleet publish`: the tool developer's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mcpfleet_sdk.api import add_api_flags


def cmd_init(args: argparse.Namespace) -> int:
    from mcpfleet_sdk.scaffold import ScaffoldError, create_project

    directory = Path(args.dir)
    try:
        names = create_project(directory, args.name, args.description)
    except ScaffoldError as exc:
        print(f"mcpfleet: {exc}", file=sys.stderr)
        return 1
    print(f"created {args.name} in {directory}: tools appear as {names.prefix}__<tool>")
    print(f"next: cd {directory} && pip install -e '.[test]' && pytest && mcpfleet dev .")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from mcpfleet_sdk.dev import dev

    call = None
    if args.call is not None:
        try:
            arguments = json.loads(args.args or "{}")
        except json.JSONDecodeError as exc:
            print(f"mcpfleet: --args is not valid JSON: {exc}", file=sys.stderr)
            return 1
        if not isinstance(arguments, dict):
            print("mcpfleet: --args must be a JSON object, e.g. '{\"city\": \"Oslo\"}'", file=sys.stderr)
            return 1
        call = (args.call, arguments)
    elif args.args is not None:
        print("mcpfleet: --args needs --call TOOL", file=sys.stderr)
        return 1
    return dev(Path(args.dir).resolve(), call=call)


def cmd_publish(args: argparse.Namespace) -> int:
    from mcpfleet_sdk.api import FleetApi
    from mcpfleet_sdk.publish import publish

    with FleetApi.for_fleet(args.url, args.key) as api:
        return publish(Path(args.dir).resolve(), api, wait_s=None if args.no_wait else args.wait)


def add_commands(sub: argparse._SubParsersAction) -> None:
    init = sub.add_parser("init", help="create a new tool project (an MCP server to publish)")
    init.add_argument("dir", help="the project's directory (new or empty)")
    init.add_argument("--name", required=True, help="the server's name in reverse-DNS form, e.g. io.example/weather")
    init.add_argument("--description", help="one line (at most 100 characters) saying what the server does")
    init.set_defaults(func=cmd_init)

    dev = sub.add_parser("dev", help="build a tool project and run it in a gVisor sandbox: its tools, start time, memory")
    dev.add_argument("dir", nargs="?", default=".", help="the tool project (default: the current directory)")
    dev.add_argument("--call", metavar="TOOL", help="call this tool (its own name, without the prefix)")
    dev.add_argument("--args", metavar="JSON", help="the call's arguments as a JSON object (default {})")
    dev.set_defaults(func=cmd_dev)

    publish = sub.add_parser(
        "publish", help="check your key, then build and upload a tool project to the registry and wait for its validation"
    )
    publish.add_argument("dir", nargs="?", default=".", help="the tool project (default: the current directory)")
    publish.add_argument("--wait", type=float, default=300.0, metavar="SECONDS", help="wait this long for validation (default 300)")
    publish.add_argument("--no-wait", action="store_true", help="return once the registry has accepted the upload")
    add_api_flags(publish)
    publish.set_defaults(func=cmd_publish)
