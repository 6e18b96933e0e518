"""`mcpfleet doctor`: what this machine and fleet home have and lack, one line per check, each
with what to do about it. It starts nothing it would have to leave running (the embedded
database is started for the check and stopped with the command, as every command does)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psycopg

from core.endpoint import gateway_url, record_path
from core.openbao import EmbeddedOpenBao, OpenBaoError, bao_binary
from core.settings import Settings, load_settings

NODE_MAJOR = 22
"""The conformance suite and the MCP Inspector (tests/conformance) need Node 22 or later."""
PROJECT_NODE = Path(__file__).resolve().parent.parent / "tests" / "conformance" / "node_modules" / ".bin" / "node"
"""The Node that tests/conformance's package.json pins (npm ci there installs it)."""
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    check: str
    status: str
    """ok, warn (works, with less) or fail (does not work)."""
    detail: str


def check_gvisor(settings: Settings) -> Check:
    if settings.sandbox_backend != "runsc":
        return Check("gvisor", "ok", f"not used here: MCPFLEET_SANDBOX_BACKEND={settings.sandbox_backend}")
    from sandbox.gvisor import choose  # the sandbox layer's imports are for this check alone

    try:
        gvisor = choose()
    except RuntimeError as exc:
        return Check("gvisor", "fail", str(exc))
    path = shutil.which(gvisor.runsc)
    if path is None:
        return Check("gvisor", "fail", f"no {gvisor.runsc}: run scripts/setup.sh, or set MCPFLEET_RUNSC to a runsc")
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("gvisor", "fail", f"{path} --version did not run ({exc}): reinstall it with scripts/setup.sh")
    first = (done.stdout or done.stderr).strip().splitlines()[:1]
    if done.returncode != 0:
        return Check("gvisor", "fail", f"{path} --version exited {done.returncode}: {' '.join(first)}")
    return Check("gvisor", "ok", f"{path} ({' '.join(first) or 'version unknown'}) on {gvisor.platform}")


def check_loop_devices(settings: Settings) -> Check:
    if settings.workspace_quotas is False:
        return Check("loop devices", "ok", "not used: MCPFLEET_WORKSPACE_QUOTAS=off (workspaces are plain directories)")
    from sandbox.manager import SANDBOX_GID, SANDBOX_UID
    from sandbox.workspaces import Workspaces

    reason = Workspaces(settings.home / "workspaces", uid=SANDBOX_UID, gid=SANDBOX_GID, quotas=False).why_no_quotas()
    if reason is None:
        return Check("loop devices", "ok", "workspaces are loop-mounted images with a disk quota")
    # Forced on, the fleet refuses to make workspaces; on auto it falls back to directories without a quota.
    status = "fail" if settings.workspace_quotas else "warn"
    return Check("loop devices", status, f"workspaces would have no disk quota: {reason} "
                 "(run the gateway as root with e2fsprogs, or set MCPFLEET_WORKSPACE_QUOTAS=off)")


def check_sandbox_mounts(settings: Settings) -> Check:
    if settings.sandbox_backend == "kubernetes":
        return Check("sandbox mounts", "ok", "not used here: the sandboxes are pods")
    from sandbox import mounts as hostmounts
    from sandbox.layout import SandboxLayout

    root = SandboxLayout.root(settings.home)
    mount = hostmounts.mount_at(root)
    if mount is not None and hostmounts.is_shared(mount):
        return Check("sandbox mounts", "ok", f"{root} is a shared mount: a workspace unmounted there is free at once")
    # Without it, a runsc process started while a workspace is mounted holds it until it has pivoted.
    if mount is not None:
        return Check("sandbox mounts", "warn", f"{root} is a mount but not shared: run `mount --make-shared {root}` "
                     "(the gateway does at its next start)")
    below = [m.mountpoint for m in hostmounts.mounts() if m.mountpoint.is_relative_to(root)]
    if below:
        return Check("sandbox mounts", "warn", f"{root} is no shared mount, and {len(below)} mounts are below it: "
                     "a gateway of old runs there; the next start of the gateway without them makes it")
    return Check("sandbox mounts", "ok", f"{root} becomes a shared mount when the gateway starts")


def check_database(settings: Settings) -> Check:
    if settings.database_url:
        url, which = settings.database_url, "DATABASE_URL"
    else:
        from core.db import resolve_database_url

        which = f"the embedded PostgreSQL in {settings.data_dir}"
        try:
            url = resolve_database_url(settings)
        except Exception as exc:  # the wheel's own errors: any of them means no database
            return Check("database", "fail", f"{which} did not start ({exc}); or set DATABASE_URL")
    try:
        with psycopg.connect(url, connect_timeout=int(TIMEOUT_S)) as conn:
            version = conn.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("database", "fail", f"{which} is unreachable: {problem} (fix or unset DATABASE_URL)"
                     if settings.database_url else f"{which} is unreachable: {problem}")
    return Check("database", "ok", f"{which}, PostgreSQL {version[0] if version else '?'}")


def check_vault(settings: Settings) -> Check:
    addr = os.environ.get("VAULT_ADDR")
    if not addr:
        try:
            bao_binary()
        except OpenBaoError as exc:
            return Check("vault", "fail", str(exc))
        running = EmbeddedOpenBao(settings.home).running()
        if running is None:
            return Check("vault", "ok", "embedded OpenBao, started by `mcpfleet up` (not running now)")
        addr, which = running, "embedded OpenBao"
    else:
        which = "VAULT_ADDR"
    try:
        health = httpx.get(f"{addr.rstrip('/')}/v1/sys/health", timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Check("vault", "fail", f"{which} {addr} is unreachable: {exc}")
    # Vault's documented codes: 200 active, 429 standby, 501 not initialised, 503 sealed.
    state = {200: None, 429: None, 473: None, 501: "not initialised", 503: "sealed"}.get(health.status_code, f"HTTP {health.status_code}")
    if state is not None:
        return Check("vault", "fail", f"{which} {addr} is {state}: unseal or initialise it")
    return Check("vault", "ok", f"{which} {addr}, unsealed")


def check_node() -> Check:
    found: list[str] = []
    for node in (shutil.which("node"), str(PROJECT_NODE) if PROJECT_NODE.exists() else None):
        if node is None:
            continue
        try:
            version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.match(r"v(\d+)\.", version)
        if match and int(match[1]) >= NODE_MAJOR:
            return Check("node", "ok", f"{node} {version} (for the conformance suite and the MCP Inspector)")
        found.append(f"{node} {version or '?'}")
    seen = f" (found {', '.join(found)})" if found else ""
    # Only the conformance and Inspector tooling needs Node: the fleet runs without it.
    return Check("node", "warn", f"no Node {NODE_MAJOR}+{seen}: `npm ci` in tests/conformance installs one")


def check_gateway(settings: Settings, flag: str | None) -> Check:
    url = gateway_url(settings, flag)
    expected = bool(flag or os.environ.get("MCPFLEET_URL") or record_path(settings).exists())
    try:
        answer = httpx.get(f"{url}/healthz", timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        if not expected:  # never started: nothing is wrong yet
            return Check("gateway", "warn", f"nothing answers at {url}: start it with `mcpfleet up`")
        return Check("gateway", "fail", f"{url} is unreachable ({type(exc).__name__}): is `mcpfleet up` running? "
                     "(or set --url / MCPFLEET_URL)")
    if answer.status_code != 200:
        return Check("gateway", "fail", f"{url}/healthz answered HTTP {answer.status_code}: see the gateway's log")
    return Check("gateway", "ok", f"{url} answers (MCP at {url}/mcp)")


def run_checks(settings: Settings, url: str | None) -> list[Check]:
    checks: list[Callable[[], Check]] = [
        lambda: check_gvisor(settings),
        lambda: check_loop_devices(settings),
        lambda: check_sandbox_mounts(settings),
        lambda: check_database(settings),
        lambda: check_vault(settings),
        check_node,
        lambda: check_gateway(settings, url),
    ]
    return [check() for check in checks]


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(load_settings(), args.url)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.check) for c in checks)
        for c in checks:
            print(f"{c.status:<4}  {c.check:<{width}}  {c.detail}")
    failed = [c.check for c in checks if c.status == "fail"]
    if failed:
        print(f"mcpfleet doctor: {len(failed)} check{'s' if len(failed) != 1 else ''} failed: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser("doctor", help="check gVisor, loop devices, the sandboxes' mounts, the database, Vault, Node and the gateway")
    doctor.add_argument("--url", help="the gateway's base URL (default: MCPFLEET_URL, else where `mcpfleet up` of "
                        "this fleet home serves)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON: check, status, detail")
    doctor.set_defaults(func=cmd_doctor)
