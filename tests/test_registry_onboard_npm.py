"""Existing MCP servers onboarded by name from the real npm registry: `mcpfleet registry add
npm:@modelcontextprotocol/server-sequential-thinking@VER` installs it (production dependencies, no
install scripts) and packs it with a launcher into the version's wheel, validates it in a runsc
sandbox where it runs with the sandboxes' Node 22 (/opt/mcpfleet/node, read-only), leaves it
pending; approved, its tool answers through the gateway."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from registry.onboard import OnboardError
from registry.onboard_npm import LAUNCHER, _bin_entry, manifest_for_npm, pack_wheel, parse_npm
from sandbox.bundle import NODE
from tests.clients import connect, text_of
from tests.test_attacks import sh
from tests.test_registry import api, cli, registry_fleet  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
    pytest.mark.skipif(not Path(NODE, "bin", "node").exists(), reason=f"no sandbox Node runtime in {NODE} (scripts/setup.sh)"),
]

THINKING = "io.npmjs.modelcontextprotocol/server-sequential-thinking"
THINKING_VERSION = "2026.8.31"


async def test_sequential_thinking_from_npm_is_added_validated_approved_and_called(registry_fleet):
    fleet = registry_fleet
    started = time.perf_counter()
    source = f"npm:@modelcontextprotocol/server-sequential-thinking@{THINKING_VERSION}"
    added = cli(fleet, fleet.keys["publisher"], "registry", "add", source)
    print(f"\nregistry add {source} (npm install, pack, trial, scans) {time.perf_counter() - started:.1f} s")
    assert added.stdout.strip().splitlines()[-1] == f"{THINKING} {THINKING_VERSION}", added.stdout
    assert "passed" in added.stdout, added.stdout
    version = json.loads(cli(fleet, fleet.keys["admin"], "registry", "show", THINKING, THINKING_VERSION, "--json").stdout)
    assert version["status"] == "passed", version["validation"]
    assert version["manifest"]["packages"][0]["registryType"] == "npm"
    assert version["manifest"]["_meta"]["io.mcpfleet"]["command"] == "mcp-server-sequential-thinking"
    assert {t["name"] for t in version["tools"]} == {"sequentialthinking"}
    npm = next(c for c in version["validation"] if c["check"] == "npm packages")  # what npm resolved, reported
    names = {p["name"] for p in npm["packages"]}
    assert {"@modelcontextprotocol/server-sequential-thinking", "@modelcontextprotocol/sdk", "chalk", "yargs"} <= names, npm
    assert all(p["integrity"].startswith("sha512-") for p in npm["packages"]), npm

    # The same package installed again packs to the same wheel: the digest an approval pins names its files.
    again = httpx.post(f"{fleet.base_url}/registry/v1/add", headers={"Authorization": f"Bearer {fleet.keys['publisher']}"},
                       json={"source": source, "name": "io.example/thinking-again"}, timeout=600)
    assert again.status_code == 202, again.text
    assert again.json()["artifact_sha256"] == version["artifact_sha256"]

    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        assert not any(t.name.startswith("server_sequential_thinking__") for t in (await client.list_tools()).tools)
    cli(fleet, fleet.keys["admin"], "registry", "approve", THINKING, THINKING_VERSION)
    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        result = await client.call_tool("server_sequential_thinking__sequentialthinking", {
            "thought": "Node runs in the sandbox", "thoughtNumber": 1, "totalThoughts": 2, "nextThoughtNeeded": True,
        })
        assert not result.is_error, text_of(result)
        answer = json.loads(text_of(result))
        assert answer["thoughtNumber"] == 1 and answer["totalThoughts"] == 2 and answer["nextThoughtNeeded"] is True, answer


def test_an_npm_add_that_cannot_be_done_says_why(registry_fleet):
    fleet = registry_fleet
    missing = cli(fleet, fleet.keys["publisher"], "registry", "add", "npm:@mcpfleet-no-such-scope/no-such-server@1.0.0", check=False)
    assert missing.returncode == 2, missing.stderr
    assert "npm cannot install @mcpfleet-no-such-scope/no-such-server@1.0.0" in missing.stderr and "404" in missing.stderr, missing.stderr
    refused = api(fleet, fleet.keys["member"], "POST", "/registry/v1/add", json={"source": "npm:@modelcontextprotocol/server-memory"})
    assert refused.status_code == 403


def test_npm_sources_bins_and_generated_manifests():
    assert parse_npm("@scope/name@1.2.3") == ("@scope/name", "1.2.3")
    assert parse_npm("name") == ("name", None)
    for bad in ("Name", "@scope/name@^1.0", "@scope/name@latest", "../x", "name@1.0.0 --registry=x"):
        with pytest.raises(OnboardError):
            parse_npm(bad)
    assert _bin_entry({"bin": "dist/index.js"}, "@scope/demo", None) == ("demo", "dist/index.js")
    assert _bin_entry({"bin": {"a": "a.js", "demo": "d.js"}}, "@s/demo", None) == ("demo", "d.js")
    with pytest.raises(OnboardError, match="name one with --command"):
        _bin_entry({"bin": {"a": "a.js", "b": "b.js"}}, "demo", None)
    with pytest.raises(OnboardError, match="not a file of the package"):
        _bin_entry({"bin": {"demo": "../../etc/passwd"}}, "demo", None)
    assert manifest_for_npm({"name": "plain", "version": "1.0.0"}, "plain")["name"] == "io.npmjs/plain"


def test_a_packed_install_leaves_out_links_and_is_reproducible(tmp_path):
    """A package's symlink (to a file of the gateway's) is never packed; npm's .bin links neither."""
    app = tmp_path / "app"
    (app / "node_modules" / "demo" / "dist").mkdir(parents=True)
    (app / "node_modules" / "demo" / "dist" / "index.js").write_text("console.log('hi')\n")
    (app / "node_modules" / "demo" / "secrets").symlink_to("/etc/passwd")
    (app / "node_modules" / ".bin").mkdir()
    (app / "node_modules" / ".bin" / "demo").symlink_to("../demo/dist/index.js")
    wheel = pack_wheel(app, "demo", "1.0.0", "demo", "node_modules/demo/dist/index.js")
    names = zipfile.ZipFile(io.BytesIO(wheel)).namelist()
    assert f"{LAUNCHER}/app/node_modules/demo/dist/index.js" in names
    assert not any("secrets" in n or ".bin" in n for n in names), names
    assert pack_wheel(app, "demo", "1.0.0", "demo", "node_modules/demo/dist/index.js") == wheel


async def test_a_sandbox_runs_the_pinned_node_and_cannot_change_it(fleet):
    """The host's own Node (Debian's, under /usr, visible in the sandbox) is not the one on PATH; the
    sandboxes' Node is read-only to what runs inside."""
    key = fleet.add_user(f"npm-node-{secrets.token_hex(3)}", role="member")
    pinned = (Path(NODE) / "version").read_text().split("-")[0].strip()
    out = await sh(fleet, key, f"node --version; touch {NODE}/planted || echo REFUSED; "
                               f"cp /bin/true {NODE}/bin/node || echo REFUSED; {NODE}/bin/node -e 'console.log(6*7)'")
    assert out["stdout"].split() == [f"v{pinned}", "REFUSED", "REFUSED", "42"], out
    assert not (Path(NODE) / "planted").exists()
