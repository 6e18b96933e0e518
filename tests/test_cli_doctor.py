"""`mcpfleet doctor` against a running fleet and a broken one, and `mcpfleet client config`: each
client's snippet is well formed, names this gateway's /mcp, and carries a key that really lists
the user's tools through the gateway (and only that user's identity)."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess

import httpx
import pytest

from tests.clients import connect
from tests.conftest import MCPFLEET, Fleet

CHECKS = ["gvisor", "loop devices", "sandbox mounts", "database", "vault", "node", "gateway"]


def run(fleet: Fleet, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in {**fleet.env, **env}.items() if k != "MCPFLEET_URL"}
    return subprocess.run([*MCPFLEET, *args], env=environ, capture_output=True, text=True, timeout=180)


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """doctor's lines, `STATUS  CHECK  DETAIL`, as {check: (status, detail)} in order."""
    rows = [re.fullmatch(r"(ok|warn|fail)\s+(\S+(?: \S+)*?)\s{2,}(.+)", line) for line in stdout.splitlines()]
    assert all(rows), stdout
    return {row[2]: (row[1], row[3]) for row in rows if row}


def test_doctor_on_a_running_fleet_passes_and_names_every_check(fleet):
    done = run(fleet, "doctor", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["check"]: c for c in json.loads(done.stdout)}
    assert list(checks) == CHECKS
    assert all(c["status"] in ("ok", "warn") for c in checks.values())
    assert checks["gateway"]["status"] == "ok" and fleet.base_url in checks["gateway"]["detail"]
    assert checks["database"]["status"] == "ok" and "DATABASE_URL" in checks["database"]["detail"]
    # The fleet's gateway runs the embedded OpenBao: doctor finds it running and unsealed.
    assert checks["vault"]["status"] == "ok" and "unsealed" in checks["vault"]["detail"]
    assert checks["gvisor"]["status"] == "ok" and "runsc" in checks["gvisor"]["detail"]
    # The gateway made its sandboxes dir a shared mount when it started.
    assert checks["sandbox mounts"]["status"] == "ok" and "is a shared mount" in checks["sandbox mounts"]["detail"]

    plain = run(fleet, "doctor")
    assert plain.returncode == 0
    rows = table(plain.stdout)
    assert list(rows) == CHECKS and {status for status, _ in rows.values()} <= {"ok", "warn"}


def test_doctor_with_an_unreachable_database_fails_naming_the_variable(fleet):
    done = run(fleet, "doctor", DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    assert done.returncode == 1
    status, detail = table(done.stdout)["database"]
    assert status == "fail" and "DATABASE_URL" in detail
    assert "failed: database" in done.stderr


def test_doctor_fails_on_a_gateway_it_was_told_of_that_does_not_answer(fleet):
    done = run(fleet, "doctor", "--json", "--url", "http://127.0.0.1:9")
    assert done.returncode == 1
    gateway = {c["check"]: c for c in json.loads(done.stdout)}["gateway"]
    assert gateway["status"] == "fail" and "mcpfleet up" in gateway["detail"]


def url_and_key(client: str, snippet: str) -> tuple[str, str]:
    """The URL and the key a client would use, read from its snippet the way the client reads it."""
    if client == "claude-code":
        argv = shlex.split(snippet)
        assert argv[:6] == ["claude", "mcp", "add", "--transport", "http", "mcpfleet"]
        header = argv[argv.index("--header") + 1]
        assert header.startswith("Authorization: Bearer ")
        return argv[6], header.removeprefix("Authorization: Bearer ")
    config = json.loads(snippet)
    if client == "claude":
        server = config["mcpServers"]["mcpfleet"]
        assert server["command"] == "npx" and "mcp-remote" in server["args"]
        # mcp-remote substitutes ${AUTH_HEADER} from the entry's env into the header it sends.
        header = server["args"][server["args"].index("--header") + 1].replace("${AUTH_HEADER}", server["env"]["AUTH_HEADER"])
        name, _, value = header.partition(":")
        assert name == "Authorization" and value.startswith("Bearer ")
        return server["args"][server["args"].index("mcp-remote") + 1], value.removeprefix("Bearer ")
    server = config["servers" if client == "vscode" else "mcpServers"]["mcpfleet"]
    if client == "vscode":
        assert server["type"] == "http"
    return server["url"], server["headers"]["Authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize("client", ["claude", "cursor", "vscode", "claude-code"])
async def test_client_config_prints_a_snippet_whose_key_lists_tools_through_this_gateway(fleet, client):
    user = f"cc-{secrets.token_hex(3)}"
    fleet.cli("users", "add", user)
    done = run(fleet, "client", "config", client, user, "--expires", "30d")
    assert done.returncode == 0, done.stderr
    url, key = url_and_key(client, done.stdout)
    assert url == fleet.mcp_url
    assert {"claude": "claude_desktop_config.json", "cursor": ".cursor/mcp.json", "vscode": ".vscode/mcp.json",
            "claude-code": "run this command"}[client] in done.stderr
    assert key not in done.stderr  # the key is in the snippet only

    async with connect(url, key) as session:
        tools = await session.list_tools()
    assert tools.tools, "the new key lists no tools"
    whoami = httpx.get(f"{fleet.base_url}/registry/v1/whoami", headers={"Authorization": f"Bearer {key}"}).json()
    assert whoami["user"] == user and whoami["tenant"] == "default" and whoami["role"] == "member"
    listed = json.loads(fleet.cli("keys", "list", "--user", user, "--json").stdout)
    assert len(listed) == 1 and listed[0]["expires"] and listed[0]["prefix"] == key.split("_")[1]


def test_client_config_for_an_unknown_user_makes_no_key(fleet):
    done = run(fleet, "client", "config", "cursor", f"nobody-{secrets.token_hex(3)}")
    assert done.returncode == 1 and done.stdout == ""
    assert "mcpfleet:" in done.stderr


def test_claude_desktop_snippet_allows_plain_http_only_where_mcp_remote_needs_it():
    from cli.client import claude_desktop

    # mcp-remote refuses http:// beyond localhost unless told; https needs nothing.
    assert "--allow-http" in json.loads(claude_desktop("http://fleet.internal:8080/mcp", "k")[0])["mcpServers"]["mcpfleet"]["args"]
    for url in ("http://127.0.0.1:8080/mcp", "https://fleet.example/mcp"):
        assert "--allow-http" not in json.loads(claude_desktop(url, "k")[0])["mcpServers"]["mcpfleet"]["args"]


def test_the_cli_starts_without_loading_the_mcp_sdk():
    """Admins' commands start in well under a second: the mcp SDK (most of a second of imports) is
    loaded only by the commands that speak MCP, and by tool servers asking for `secret`."""
    import subprocess
    import sys

    probe = "import sys, cli.main, mcpfleet_sdk; print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
    secret = subprocess.run([sys.executable, "-c", "from mcpfleet_sdk import secret, SecretError; print(SecretError.__mro__[1].__name__)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert secret == "ToolError", secret
