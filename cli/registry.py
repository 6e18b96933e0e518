"""`mcpfleet registry`: the tool registry, through the gateway's API (`--url`/`--key`, or `MCPFLEET_URL`/`MCPFLEET_KEY`),
so the caller's role decides as it does for the admin page: publishers cannot approve.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from cli.run import api_command
from cli.table import add_json_flag, print_rows
from mcpfleet_sdk.api import FleetApi
from mcpfleet_sdk.publish import check_mark, format_validation, wait_for_verdict


def _version_path(name: str, version: str) -> str:
    if name.count("/") != 1:
        raise SystemExit(f"mcpfleet: {name!r} is not a server name like io.example/weather")
    return f"/registry/v1/servers/{name}/versions/{version}"


def print_validation(version: dict[str, Any]) -> None:
    print(f"{version['name']} {version['version']}: {version['status']}")
    for check in version.get("validation") or []:
        print(f"  {check_mark(check)} {check['check']}: {check.get('detail', '')}")
        for finding in check.get("findings") or []:
            print(f"         {finding.get('tool')} {finding.get('path')}: {finding.get('message')}")


def list_(args: argparse.Namespace, api: FleetApi) -> int:
    servers = api.request("GET", "/registry/v1/servers").json()["servers"]
    if args.json:
        print(json.dumps(servers, indent=2))
        return 0
    rows = [
        {"server": server["name"], "prefix": server["prefix"], "version": version["version"], "status": version["status"],
         "approved": ", ".join(a["group"] or "tenant" for a in version["approvals"]) or None}
        for server in servers for version in server["versions"]
    ]
    print_rows(args, (("server", "SERVER"), ("prefix", "PREFIX"), ("version", "VERSION"), ("status", "STATUS"),
                      ("approved", "APPROVED FOR")), rows)
    return 0


def show(args: argparse.Namespace, api: FleetApi) -> int:
    version = api.request("GET", _version_path(args.name, args.version)).json()
    if args.json:
        print(json.dumps(version, indent=2))
        return 0
    print_validation(version)
    if version.get("decided_by"):
        reason = f": {version['decision_reason']}" if version.get("decision_reason") else ""
        print(f"  {version['status']} by {version['decided_by']}{reason}")
    print(f"  artifact sha256 {version.get('artifact_sha256')}, published by {version.get('published_by')}")
    if version.get("layer_sha256"):
        listed = ", ".join(f"{p['name']} {p['version']}" for p in version.get("layer") or [])
        print(f"  dependency layer sha256 {version['layer_sha256']}: {listed}")
    if version.get("start_ms") is not None:
        memory = version.get("memory_bytes")
        print(f"  trial: started in {version['start_ms']} ms" + (f", {memory / 2**20:.0f} MiB" if memory else ""))
    for tool in version.get("tools") or []:
        print(f"  tool {tool['name']}: {(tool.get('description') or '').splitlines()[0] if tool.get('description') else ''}")
    offerings = version.get("offerings") or {}
    for kind, listing, ident in (("prompt", "prompts", "name"), ("resource", "resources", "uri"),
                                 ("template", "resourceTemplates", "uriTemplate")):
        for item in offerings.get(listing) or []:
            print(f"  {kind} {item.get(ident)}: {((item.get('description') or '').splitlines() or [''])[0]}")
    if offerings.get("instructions"):
        print(f"  instructions: {json.dumps(offerings['instructions'])[:200]}")
    diff = version.get("diff") or {}
    changes = [d for d in diff.get("tools") or [] if d["change"] != "same"]
    changes += [{**d, "tool": f"{d['kind']} {d['name']}"} for d in diff.get("offerings") or [] if d["change"] != "same"]
    if diff.get("against"):
        print(f"  against approved {diff['against']}: " + (", ".join(f"{d['tool']} {d['change']}" for d in changes) or "no change"))
    for approval in version.get("approvals") or []:
        print(f"  approved for {approval['group'] or 'the tenant'} by {approval['approved_by']}"
              f"{' (override)' if approval['override'] else ''}")
    return 0


def approve(args: argparse.Namespace, api: FleetApi) -> int:
    def names(value: str | None) -> list[str] | None:
        return [t.strip() for t in value.split(",") if t.strip()] if value is not None else None

    body = {"group": args.group, "tier": args.tier, "tools": names(args.tools), "prompts": names(args.prompts),
            "resources": names(args.resources), "override": args.override}
    result = api.request("POST", _version_path(args.name, args.version) + "/approve", json=body).json()["approved"]
    scope = f"group {result['group']}" if result["group"] else "the tenant"
    scope += f", tier {result['tier']}" if result.get("tier") else ""
    for what in ("tools", "prompts", "resources"):
        if result.get(what) is not None:
            scope += f", {what} {', '.join(result[what]) or 'none'}"
    others = len(result["pins"]) - result.get("tool_pins", len(result["pins"]))
    print(f"approved {args.name} {args.version} for {scope}; {result.get('tool_pins', len(result['pins']))} tool definition(s) pinned"
          f"{f' and {others} prompt, resource or instructions definition(s)' if others else ''}"
          f"{' (validation overridden)' if result['override'] else ''}")
    if result.get("layer_sha256"):
        print(f"  its dependency layer is pinned: sha256 {result['layer_sha256']}")
    return 0


def add(args: argparse.Namespace, api: FleetApi) -> int:
    """An existing MCP server from PyPI, published as an upload is: validated, then pending approval.
    The last line of output is the created `NAME VERSION`."""
    print(f"adding {args.source}: the gateway downloads it and resolves its dependencies", flush=True)
    answer = api.request("POST", "/registry/v1/add", json={"source": args.source, "name": args.name, "command": args.command}).json()
    print(f"{answer['name']} {answer['version']}: {answer['status']} (console script "
          f"{answer['manifest']['_meta']['io.mcpfleet']['command']}, wheel sha256 {answer['artifact_sha256']})", flush=True)
    print(f"server.json {answer.get('server_json') or 'generated'}", flush=True)
    status = answer["status"]
    if not args.no_wait:
        print(f"waiting up to {args.wait:g} s for validation (dependencies, a trial run in a sandbox, the scans)", flush=True)
        version = wait_for_verdict(api, answer["url"], args.wait)
        print(format_validation(version))
        status = version.get("status", status)
        if status == "passed":
            print(f"pending approval: mcpfleet registry approve {answer['name']} {answer['version']}")
    print(f"{answer['name']} {answer['version']}")
    return 0 if status in ("passed", "validating") and (args.no_wait or status == "passed") else 1


def revoke(args: argparse.Namespace, api: FleetApi) -> int:
    api.request("POST", _version_path(args.name, args.version) + "/revoke", json={"group": args.group, "tier": args.tier})
    print(f"revoked {args.name} {args.version} for {'group ' + args.group if args.group else 'the tenant'}")
    return 0


def drift(args: argparse.Namespace, api: FleetApi) -> int:
    drift = api.request("GET", "/registry/v1/drift").json()["drift"]
    if args.json:
        print(json.dumps(drift, indent=2))
        return 0
    if not drift:
        print("no withheld tool definitions")
    for d in drift:
        print(f"{d['id']:>5} {d['server']} {d['version']} tool {d['tool']}: live {d['live_sha256'][:12]}"
              f" != pinned {(d['pinned_sha256'] or 'none')[:12]} (since {d['first_seen_at']})")
        print(f"        seen in the sandbox of: {', '.join(d.get('seen_in_sandboxes_of') or []) or 'nobody still known'}")
        print(f"        now: {json.dumps(d['live_definition'].get('description'))}")
    return 0


def accept(args: argparse.Namespace, api: FleetApi) -> int:
    result = api.request("POST", f"/registry/v1/drift/{args.id}/accept").json()["accepted"]
    seen = ", ".join(result.get("seen_in_sandboxes_of") or []) or "nobody still known"
    print(f"accepted the new definition of {result['tool']} in {result['server']} {result['version']}"
          f" (seen in the sandbox of: {seen}); the approved definition stays allowed too")
    return 0


def usage(args: argparse.Namespace, api: FleetApi) -> int:
    rows = api.request("GET", "/registry/v1/usage").json()["usage"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [{**r, "avg_ms": f"{r['avg_ms'] or 0:.1f}", "max_ms": f"{r['max_ms'] or 0:.1f}"} for r in rows]
    print_rows(args, (("server", "SERVER"), ("version", "VERSION"), ("tool", "TOOL"), ("calls", "CALLS"),
                      ("errors", "ERRORS"), ("avg_ms", "AVG MS"), ("max_ms", "MAX MS")), shown)
    return 0


def _decide(decision: str) -> Callable[[argparse.Namespace, FleetApi], int]:
    def command(args: argparse.Namespace, api: FleetApi) -> int:
        path = _version_path(args.name, args.version) + ("/reject" if decision == "rejected" else "/withdraw")
        api.request("POST", path, json={"reason": args.reason})
        print(f"{args.name} {args.version}: {decision}" + (f" ({args.reason})" if args.reason else ""))
        return 0

    return command


def _version_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the server's name, e.g. io.example/weather")
    parser.add_argument("version", help="the version, e.g. 1.0.0 (see `mcpfleet registry list`)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    registry = sub.add_parser("registry", help="the tool registry (through the gateway: --url/--key or MCPFLEET_URL/MCPFLEET_KEY)")
    actions = registry.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list", help="servers, their versions and approvals")
    add_json_flag(ls)
    api_command(ls, list_)
    show_ = actions.add_parser("show", help="a version: validation, tools, diff against the approved one")
    _version_arguments(show_)
    add_json_flag(show_)
    api_command(show_, show)
    approve_ = actions.add_parser("approve", help="approve a version for the tenant or a group (admins)")
    _version_arguments(approve_)
    approve_.add_argument("--group", help="only for the members of this group")
    approve_.add_argument("--tier", help="only for the users on this tier")
    approve_.add_argument("--tools", help="only these of its tools (comma-separated own names); then no prompt or resource unless named")
    approve_.add_argument("--prompts", help="only these of its prompts (comma-separated names; empty: none)")
    approve_.add_argument("--resources", help="only these of its resources (comma-separated URIs or URI templates; empty: none)")
    approve_.add_argument("--override", action="store_true", help="approve although validation failed (audited)")
    api_command(approve_, approve)
    add_ = actions.add_parser("add", help="add an existing MCP server from PyPI or npm as a new version, pending approval (publishers)")
    add_.add_argument("source", help="pypi:NAME[==VERSION] (a package whose console script is a stdio MCP server) or npm:NAME[@VERSION] / "
                      "npm:@scope/name@version (a package whose bin is one, run with the sandboxes' Node 22)")
    add_.add_argument("--name", help="its name in the registry (default io.pypi/NAME, io.npmjs.SCOPE/NAME; the part after '/' prefixes its tools)")
    add_.add_argument("--command", help="the console script (npm: the bin) to run, when the package has several")
    add_.add_argument("--wait", type=float, default=300.0, help="seconds to wait for validation (default 300)")
    add_.add_argument("--no-wait", action="store_true", help="return once the gateway has the package")
    api_command(add_, add)
    revoke_ = actions.add_parser("revoke", help="revoke a version's approval (admins)")
    _version_arguments(revoke_)
    revoke_.add_argument("--group", help="the group the approval is for (default: the whole tenant)")
    revoke_.add_argument("--tier", help="the tier the approval is for (default: any tier)")
    api_command(revoke_, revoke)
    for decision, action, text in (
        ("rejected", "reject", "reject a version that is not approved (admins): it can no longer be approved"),
        ("withdrawn", "withdraw", "withdraw a version you published that is not approved (its publisher, or admins)"),
    ):
        decide = actions.add_parser(action, help=text)
        _version_arguments(decide)
        decide.add_argument("--reason", help="why, for the audit log and `registry show`")
        api_command(decide, _decide(decision))
    drift_ = actions.add_parser("drift", help="tools withheld because their live definition differs from the pinned one")
    add_json_flag(drift_)
    api_command(drift_, drift)
    accept_ = actions.add_parser("accept", help="pin a withheld tool's new definition (admins)")
    accept_.add_argument("id", type=int, help="the drift's id, as `mcpfleet registry drift` lists it")
    api_command(accept_, accept)
    usage_ = actions.add_parser("usage", help="calls, errors and latency per tool version")
    add_json_flag(usage_)
    api_command(usage_, usage)
