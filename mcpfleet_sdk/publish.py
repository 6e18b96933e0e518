"""`mcpfleet publish DIR`: validate locally, build the wheel, upload it, wait for the registry's verdict.

Exit status: 0 when the version passed validation (or was accepted, with --no-wait), 1 when
the project is not valid here or the version failed validation (or is still validating at
the deadline), 2 when the gateway refused the request or could not be reached.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mcpfleet_sdk import project as projects
from mcpfleet_sdk.api import FleetApi, FleetApiError
from mcpfleet_sdk.build import BuildError, build_wheel, check_wheel

PUBLISH_PATH = "/registry/v1/publish"
PUBLISHER_ROLES = ("admin", "publisher")
VALIDATING = "validating"
PASSED = "passed"
POLL_INTERVAL_S = 1.0
POLL_INTERVAL_MAX_S = 5.0


def publish(
    directory: Path,
    api: FleetApi,
    *,
    wait_s: float | None = 300.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Publish the project in `directory`; `wait_s=None` returns once the registry has the upload."""
    manifest = projects.load_or_report(directory, err)
    if manifest is None:
        return 1
    manifest_text = (directory / projects.MANIFEST).read_text(encoding="utf-8")
    # The key and the caller's role first: building the wheel takes seconds that a wrong key would waste.
    try:
        who = api.whoami()
    except FleetApiError as exc:
        print(f"mcpfleet: cannot publish {manifest.name} {manifest.version}: {exc}", file=err)
        return 2
    if who.get("role") not in PUBLISHER_ROLES:
        print(
            f"mcpfleet: cannot publish {manifest.name} {manifest.version}: {who.get('tenant')}/{who.get('user')} is "
            f"{who.get('role')!r}; publishing needs a publisher's or an admin's key "
            f"(an admin runs `mcpfleet users role {who.get('user')} publisher`)",
            file=err,
        )
        return 2
    print(f"publishing {manifest.name} {manifest.version} as {who.get('tenant')}/{who.get('user')}; building the wheel",
          file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="mcpfleet-publish-") as scratch:
        try:
            wheel = build_wheel(directory, Path(scratch))
            check_wheel(wheel, manifest.package, manifest.version)
        except BuildError as exc:
            print(f"mcpfleet: {exc}", file=err)
            return 1
        print(f"built {wheel.name}; uploading to {api.url}", file=out, flush=True)
        try:
            with open(wheel, "rb") as stream:
                answer = api.request(
                    "POST",
                    PUBLISH_PATH,
                    data={"manifest": manifest_text},
                    files={"wheel": (wheel.name, stream, "application/octet-stream")},
                ).json()
        except FleetApiError as exc:
            print(f"mcpfleet: publishing {manifest.name} {manifest.version} was refused: {exc}", file=err)
            return 2

    url = answer["url"]
    print(f"{answer['name']} {answer['version']}: {answer['status']} ({url})", file=out)
    if wait_s is None:
        return 0
    print(f"waiting up to {wait_s:g} s for validation (a trial run in a sandbox, then the scans)", file=out, flush=True)
    try:
        version = wait_for_verdict(api, url, wait_s, sleep=sleep)
    except FleetApiError as exc:
        print(f"mcpfleet: reading the validation of {manifest.name} {manifest.version} failed: {exc}", file=err)
        return 2
    if version.get("status") == VALIDATING:
        print(f"mcpfleet: still validating after {wait_s:g} s; see {api.url}{url}", file=err)
        return 1
    print(format_validation(version), file=out)
    return 0 if version.get("status") == PASSED else 1


def wait_for_verdict(
    api: FleetApi, url: str, wait_s: float, *, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """GET the version until its status is no longer "validating", or the time is up (then the last answer)."""
    deadline = time.monotonic() + wait_s
    interval = POLL_INTERVAL_S
    while True:
        version = api.request("GET", url).json()
        if version.get("status") != VALIDATING:
            return version
        left = deadline - time.monotonic()
        if left <= 0:
            return version
        sleep(min(interval, left))
        interval = min(interval * 1.5, POLL_INTERVAL_MAX_S)


def format_validation(version: dict[str, Any]) -> str:
    """The version's verdict and each check's outcome, with its findings, one per line."""
    lines = [f"validation of {version.get('name', '?')} {version.get('version', '?')}: {version.get('status')}"]
    checks = version.get("validation") or []
    width = max((len(str(c.get("check", ""))) for c in checks), default=0)
    for check in checks:
        mark = check_mark(check)
        detail = check.get("detail") or ""
        lines.append(f"  {mark}  {str(check.get('check', '')).ljust(width)}  {detail}".rstrip())
        for finding in check.get("findings") or []:
            lines.append(f"          - {_finding_text(finding)}")
    return "\n".join(lines)


def check_mark(check: dict[str, Any]) -> str:
    """`ok  `, `FAIL`, or `NOTE` for an advisory check (the model review) that flags something: it never
    fails validation, but an admin should read what it says."""
    if not check.get("ok"):
        return "FAIL"
    return "NOTE" if check.get("advisory") and check.get("findings") else "ok  "


def _finding_text(finding: Any) -> str:
    if isinstance(finding, str):
        return finding
    if isinstance(finding, dict):
        message = finding.get("message") or finding.get("detail")
        # A scan finding names its tool and where in it; a code finding, its package and file.
        where = " ".join(str(part) for part in (finding.get("tool") or finding.get("field"), finding.get("path")) if part)
        if message:
            return f"{where}: {message}" if where else str(message)
    return json.dumps(finding, sort_keys=True)
