"""Existing MCP servers onboarded by name from the real PyPI: `mcpfleet registry add pypi:NAME==VER`
downloads the official `mcp-server-time`, resolves its dependencies into a layer, validates it in a
runsc sandbox, leaves it pending; approved, its tool answers through the gateway."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from registry.onboard import OnboardError, manifest_for, parse_source
from tests.clients import connect, structured, text_of
from tests.test_registry import api, cli, registry_fleet  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

TIME = "io.pypi/mcp-server-time"
TIME_VERSION = "2026.10.19"


async def test_mcp_server_time_from_pypi_is_added_validated_approved_and_called(registry_fleet):
    fleet = registry_fleet
    started = time.perf_counter()
    added = cli(fleet, fleet.keys["publisher"], "registry", "add", f"pypi:mcp-server-time=={TIME_VERSION}")
    print(f"\nregistry add pypi:mcp-server-time (download, resolve, trial, scans) {time.perf_counter() - started:.1f} s")
    assert added.stdout.strip().splitlines()[-1] == f"{TIME} {TIME_VERSION}", added.stdout
    assert "passed" in added.stdout, added.stdout
    assert "server.json generated from the package's metadata" in added.stdout, added.stdout  # it ships none (wheel, sdist)
    version = json.loads(cli(fleet, fleet.keys["admin"], "registry", "show", TIME, TIME_VERSION, "--json").stdout)
    checks = {c["check"]: c for c in version["validation"]}
    assert checks["manifest"]["source"] == "generated from the package's metadata"
    assert checks["dependency code"]["detail"] == "3 wheel(s) scanned: nothing found", checks["dependency code"]
    assert version["status"] == "passed"
    assert version["manifest"]["_meta"]["io.mcpfleet"]["command"] == "mcp-server-time"
    assert {t["name"] for t in version["tools"]} == {"get_current_time", "convert_time"}
    deps = next(c for c in version["validation"] if c["check"] == "dependencies")
    assert {p["name"].lower() for p in deps["packages"]} == {"tzdata", "tzlocal"}, deps  # mcp, pydantic: the runtime's
    assert version["layer_sha256"] == deps["layer_sha256"]

    # Pending like any published version: nobody sees it until an admin approves it.
    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        assert not any(t.name.startswith("mcp_server_time__") for t in (await client.list_tools()).tools)
    cli(fleet, fleet.keys["admin"], "registry", "approve", TIME, TIME_VERSION)
    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        result = await client.call_tool("mcp_server_time__get_current_time", {"timezone": "Asia/Tokyo"})
        assert not result.is_error, text_of(result)
        answer = structured(result) or json.loads(text_of(result))
        assert answer["timezone"] == "Asia/Tokyo" and answer["datetime"].endswith("+09:00"), answer


def test_an_add_that_cannot_be_done_says_why(registry_fleet):
    fleet = registry_fleet
    missing = cli(fleet, fleet.keys["publisher"], "registry", "add", "pypi:mcpfleet-no-such-package-xyz==1.0", check=False)
    assert missing.returncode == 2 and "mcpfleet-no-such-package-xyz==1.0 has no wheel pip can download" in missing.stderr, missing.stderr
    # Members add nothing; through the API as through the CLI.
    refused = api(fleet, fleet.keys["member"], "POST", "/registry/v1/add", json={"source": "pypi:mcp-server-time"})
    assert refused.status_code == 403


def test_sources_and_generated_manifests():
    assert str(parse_source("pypi:mcp-server-time==1.2")) == "mcp-server-time==1.2"
    for bad in ("mcp-server-time", "pypi:", "npm:x", "pypi:x>=1", "pypi:x[extra]==1", "pypi:x @ https://example.com/x.whl"):
        with pytest.raises(OnboardError):
            parse_source(bad)
    metadata = {"Name": "Demo_Server", "Version": "1.0", "Summary": "Demo"}
    assert manifest_for(metadata, {"demo-server": "demo:main", "demo-cli": "demo:cli"})["_meta"]["io.mcpfleet"]["command"] == "demo-server"
    assert manifest_for(metadata, {"x": "demo:main"}, name="io.example/demo")["name"] == "io.example/demo"
    with pytest.raises(OnboardError, match="name one with --command"):
        manifest_for(metadata, {"a": "demo:a", "b": "demo:b"})
