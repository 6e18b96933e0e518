"""No credential leaks: a real gateway is given API keys and OAuth tokens, good and bad, tool calls
that fail and bodies that do not parse; then none of those strings may appear in its log file, the
HTTP answers, the audit log, tool results or any file under the fleet's home (sandbox logs too)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, text_of
from tests.conftest import make_fleet
from tests.test_oauth import INIT, JSON_HEADERS, Issuer, refused_tokens

READ_AT_MOST = 8 << 20  # bytes of each file under the home; logs are far smaller


@pytest.fixture(scope="module")
def issuers():
    made = {"acme": Issuer("/realms/acme"), "beta": Issuer()}  # beta is not trusted here: its keys only forge
    yield made
    for issuer in made.values():
        issuer.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, issuers):
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_ALLOW_PRIVATE_ISSUERS="1")
    running.env["MCPFLEET_PUBLIC_URL"] = running.mcp_url
    running.cli("tenants", "add", "acme")
    running.cli("issuers", "add", "--tenant", "acme", "--issuer", issuers["acme"].url)
    running.start()
    yield running
    running.stop()


def post(fleet, token: str | None, body: bytes | dict = INIT) -> httpx.Response:
    headers = {**JSON_HEADERS, **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    if isinstance(body, bytes):
        return httpx.post(fleet.mcp_url, content=body, headers=headers, timeout=30)
    return httpx.post(fleet.mcp_url, json=body, headers=headers, timeout=30)


def files_under(root: Path):
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    yield path, f.read(READ_AT_MOST)
        except OSError:  # sockets, files a sandbox still holds closed to us
            continue


async def test_no_key_token_or_secret_appears_anywhere(fleet, issuers):
    acme = issuers["acme"]
    key = fleet.add_user("alice", tenant="acme")
    prefix = key.split("_")[1]
    wrong_secret = f"mcpf_{prefix}_" + "w" * 43
    unknown = "mcpf_zzzzzzzzzzzz_" + "u" * 43
    good_token = acme.mint(fleet.mcp_url, sub="sub-redact")
    bad_tokens = refused_tokens(fleet, issuers)
    no_scope = acme.mint(fleet.mcp_url, sub="sub-redact", scope="openid")
    secrets = [key, key.split("_", 2)[2], wrong_secret, unknown, good_token, no_scope, *bad_tokens.values()]

    seen: list[str] = []  # every answer the gateway gave: bodies and headers
    def keep(response: httpx.Response) -> httpx.Response:
        seen.append(response.text + json.dumps(dict(response.headers)))
        return response

    assert keep(post(fleet, key)).status_code == 200
    assert keep(post(fleet, good_token)).status_code == 200
    assert keep(post(fleet, wrong_secret)).status_code == 401
    assert keep(post(fleet, unknown)).status_code == 401
    assert keep(post(fleet, no_scope)).status_code == 403
    for token in bad_tokens.values():
        assert keep(post(fleet, token)).status_code == 401
    for body in (b"{not json", b'{"jsonrpc": "2.0", "id": 1, "method": 7}', b"[" * 5000, b""):
        assert keep(post(fleet, key, body)).status_code >= 400
        assert keep(post(fleet, good_token, body)).status_code >= 400
    assert keep(post(fleet, key + "trailing")).status_code == 401

    results: list[str] = []
    for credential in (key, good_token):
        async with connect(fleet.mcp_url, credential) as client:
            for tool, arguments in (
                ("workspace__read_file", {"path": "missing.txt"}),  # a tool error
                ("exec__run", {"command": "env; cat /proc/self/environ", "timeout_s": 30}),
                ("exec__run", {"command": 17}),  # arguments the tool refuses
                ("nosuch__tool", {"token": "x"}),  # a JSON-RPC error
            ):
                try:
                    results.append(text_of(await client.call_tool(tool, arguments)))
                except MCPError as exc:
                    results.append(str(exc))

    time.sleep(1.5)  # the audit writer's next batch
    fleet.stop()  # and the queue is flushed on shutdown
    try:
        audit_log = fleet.cli("audit", "export", "--json").stdout
        entries = [json.loads(line) for line in audit_log.splitlines()]
        places = {"gateway log": fleet.log(), "HTTP answers": "\n".join(seen), "audit log": audit_log,
                  "tool results": "\n".join(results)}
        for secret in secrets:
            for where, text in places.items():
                assert secret not in text, f"a credential appears in the {where}"
        for path, data in files_under(fleet.home):
            for secret in secrets:
                assert secret.encode() not in data, f"a credential appears in {path}"

        # And the refusals are there, each with its reason, by prefix or issuer only.
        reasons = {e["detail"]["reason"] for e in entries if e["action"] == "auth.refused"}
        assert {"wrong key secret", "unknown key", "missing scope", "expired token", "wrong audience",
                "foreign issuer", "algorithm not accepted", "bad signature", "malformed token"} <= reasons, reasons
        assert any(e["action"] == "auth.accepted" and e["detail"].get("issuer") == acme.url for e in entries)
    finally:
        fleet.start()  # the module fixture stops it again
