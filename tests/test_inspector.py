"""The MCP Inspector's CLI, an independent client, against the gateway: what the README tells users to do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

INSPECTOR = Path(__file__).resolve().parent / "conformance" / "node_modules" / ".bin" / "mcp-inspector"


def inspector(url: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    if not INSPECTOR.exists():
        pytest.fail("the MCP Inspector is not installed: run `npm ci --prefix tests/conformance`")
    headers = ["--header", f"Authorization: Bearer {key}"] if key else []
    return subprocess.run([str(INSPECTOR), "--cli", url, *headers, *args], capture_output=True, text=True, timeout=180)


def test_inspector_lists_and_calls_tools(fleet):
    key = fleet.add_user("ivy")
    listed = inspector(fleet.mcp_url, "--method", "tools/list", key=key)
    assert listed.returncode == 0, listed.stderr
    names = [tool["name"] for tool in json.loads(listed.stdout)["tools"]]
    assert "workspace__write_file" in names and "exec__run" in names

    written = inspector(fleet.mcp_url, "--method", "tools/call", "--tool-name", "workspace__write_file",
                        "--tool-arg", "path=from-inspector.txt", "content=hello inspector", key=key)
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["isError"] is False

    ran = inspector(fleet.mcp_url, "--method", "tools/call", "--tool-name", "exec__run",
                    "--tool-arg", "command=cat /workspace/from-inspector.txt", key=key)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["structuredContent"]["stdout"] == "hello inspector"


def test_inspector_without_a_key_is_refused(fleet):
    refused = inspector(fleet.mcp_url, "--method", "tools/list")
    assert refused.returncode != 0
    # The 401 sends the Inspector to its OAuth flow, which a non-interactive run cannot finish.
    assert json.loads(refused.stderr.strip().splitlines()[-1])["error"]["code"] == "auth_required", refused.stderr
