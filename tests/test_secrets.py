"""Users' secrets end to end, against a real gateway, real gVisor sandboxes and the real embedded
OpenBao it starts: `mcpfleet secrets` and /api/secrets, injection of exactly the declared names
over the channel, rotation restarting one server, the missing-secret and Vault-down errors, and
the attacks: bob never reaches alice's value (his tools, his exec reading /proc, his API), and
no value is ever in a log, an audit entry, an error, a result or a file under the fleet home
outside OpenBao's (encrypted) storage."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

import psycopg
import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, structured, text_of
from tests.conftest import make_fleet
from tests.test_registry import MCPFLEET, api, cli, project

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

KEYED = "io.example/keyed"
TOKEN = "KEYED_TOKEN"
TOOLS = """
import hashlib, sys
count = 0

@server.tool()
def fingerprint() -> dict:
    value = os.environ.get("KEYED_TOKEN", "")
    return {"sha256": hashlib.sha256(value.encode()).hexdigest() if value else None,
            "undeclared": sorted(k for k in os.environ if k.startswith("OTHER_"))}

@server.tool()
def bump() -> int:
    global count
    count += 1
    return count

@server.tool()
def leak() -> str:
    # A careless server: the value on stderr, which the supervisor's log must redact.
    print("token is", os.environ.get("KEYED_TOKEN"), file=sys.stderr, flush=True)
    return "logged"
"""
PLAIN_TOOLS = """
count = 0

@server.tool()
def bump() -> int:
    global count
    count += 1
    return count
"""

VALUES: list[str] = []
"""Every value set in this module: none may show up anywhere but in OpenBao's storage."""


def value() -> str:
    made = f"v-{secrets.token_hex(16)}"
    VALUES.append(made)
    return made


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def with_secrets(root: Path, names: list[str]) -> Path:
    manifest = json.loads((root / "server.json").read_text())
    manifest["_meta"] = {"io.mcpfleet": {"secrets": names}}
    (root / "server.json").write_text(json.dumps(manifest))
    return root


def secrets_cli(fleet, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*MCPFLEET, "secrets", *args], env=fleet.env, input=stdin, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"mcpfleet secrets {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


async def call(fleet, key: str, tool: str, args: dict | None = None):
    """One call on a new session; a JSON-RPC error raised as it is (not inside the client's task group's)."""
    async with connect(fleet.mcp_url, key) as client:
        try:
            return await client.call_tool(tool, args or {})
        except MCPError as exc:
            error = exc
    raise error


@pytest.fixture(scope="module")
def vault_fleet(tmp_path_factory, postgres_url):
    running = make_fleet(tmp_path_factory, postgres_url)
    started = time.perf_counter()
    running.start()
    print(f"\ngateway with its embedded OpenBao ready in {time.perf_counter() - started:.1f} s")
    running.keys = {name: running.add_user(name, role=role) for name, role in
                    (("admin-1", "admin"), ("pub-1", "publisher"), ("alice", "member"), ("bob", "member"))}
    tmp = tmp_path_factory.mktemp("projects")
    for name, code, names in ((KEYED, TOOLS, [TOKEN]), ("io.example/plain", PLAIN_TOOLS, [])):
        root = with_secrets(project(tmp, name, "1.0.0", code), names)
        assert "passed" in cli(running, running.keys["pub-1"], "publish", str(root)).stdout
        cli(running, running.keys["admin-1"], "registry", "approve", name, "1.0.0")
    yield running
    running.stop()


def test_the_embedded_openbao_is_set_up_privately(vault_fleet):
    bao = vault_fleet.home / "openbao"
    for name in ("unseal-key", "root-token", "audit.log"):
        assert (bao / name).stat().st_mode & 0o777 == 0o600, name
    assert (bao / "data").stat().st_mode & 0o777 == 0o700
    log = vault_fleet.log()
    assert "embedded OpenBao" in log or "OpenBao at" in log, log[-2000:]
    root_token = (bao / "root-token").read_text().strip()
    assert root_token not in log


def test_set_list_rm_from_the_cli_never_show_the_value(vault_fleet):
    """io.example/other is approved nowhere: set with --force (ahead of an approval)."""
    fleet = vault_fleet
    secret = value()
    done = secrets_cli(fleet, "set", "--force", "alice", "io.example/other", "OTHER_KEY", stdin=secret + "\n")
    assert "version 1" in done.stdout and secret not in done.stdout + done.stderr
    secrets_cli(fleet, "set", "--force", "alice", "io.example/other", "OTHER_KEY", stdin=value())
    listed = json.loads(secrets_cli(fleet, "list", "alice", "--json").stdout)
    assert [(s["server"], s["name"], s["version"]) for s in listed] == [("io.example/other", "OTHER_KEY", 2)]
    assert listed[0]["updated_at"] and "value" not in listed[0]
    table = secrets_cli(fleet, "list", "alice").stdout
    assert "OTHER_KEY" in table and not any(v in table for v in VALUES)
    # Bad names, an unknown user, no value: refused with a reason.
    assert "invalid secret name" in secrets_cli(fleet, "set", "--force", "alice", "io.example/other", "lower", stdin="x", check=False).stderr
    assert "no user" in secrets_cli(fleet, "set", "nobody", "io.example/other", "OTHER_KEY", stdin="x", check=False).stderr
    assert "no value" in secrets_cli(fleet, "set", "--force", "alice", "io.example/other", "OTHER_KEY", stdin="", check=False).stderr
    secrets_cli(fleet, "rm", "alice", "io.example/other", "OTHER_KEY")
    assert json.loads(secrets_cli(fleet, "list", "alice", "--json").stdout) == []
    assert secrets_cli(fleet, "rm", "alice", "io.example/other", "OTHER_KEY", check=False).returncode == 1


async def test_a_server_gets_its_users_value_and_bob_never_reaches_alices(vault_fleet):
    fleet, keys = vault_fleet, vault_fleet.keys
    alices = value()
    secrets_cli(fleet, "set", "alice", KEYED, TOKEN, stdin=alices)
    # An undeclared secret of the same server never reaches it.
    secrets_cli(fleet, "set", "--force", "alice", KEYED, "OTHER_UNDECLARED", stdin=value())

    got = structured(await call(fleet, keys["alice"], "keyed__fingerprint"))
    assert got == {"sha256": sha(alices), "undeclared": []}

    # Bob has none: his calls fail naming the secret and the command that sets it.
    with pytest.raises(MCPError) as refused:
        await call(fleet, keys["bob"], "keyed__fingerprint")
    message = str(refused.value)
    assert TOKEN in message and f"mcpfleet secrets set bob {KEYED} {TOKEN}" in message, message
    assert alices not in message

    # Bob's exec, reading every process's environment and memory maps it can see in his sandbox.
    async with connect(fleet.mcp_url, keys["bob"]) as client:
        out = structured(await client.call_tool("exec__run", {
            "command": "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c KEYED_TOKEN=; "
                       "grep -rl KEYED_TOKEN /proc/[0-9]*/environ /workspace 2>/dev/null; env | grep -c '^KEYED' ; true",
            "timeout_s": 30}))
    assert alices not in json.dumps(out)
    assert out["stdout"].split()[:1] == ["0"], out

    # Bob's API: his list holds nothing of alice's; deleting "his" copy of the name leaves hers alone.
    listed = api(fleet, keys["bob"], "GET", "/api/secrets").json()
    assert listed == {"secrets": [], "tenant": []}
    assert api(fleet, keys["bob"], "DELETE", f"/api/secrets/{KEYED}/{TOKEN}").status_code == 404
    assert api(fleet, keys["bob"], "PUT", f"/api/tenant-secrets/{KEYED}/{TOKEN}", json={"value": "x" * 8}).status_code == 403
    assert structured(await call(fleet, keys["alice"], "keyed__fingerprint"))["sha256"] == sha(alices)

    # Bob sets his own through the API: he gets his, alice keeps hers.
    bobs = value()
    put = api(fleet, keys["bob"], "PUT", f"/api/secrets/{KEYED}/{TOKEN}", json={"value": bobs})
    assert put.status_code == 200 and put.json()["user"] == "bob" and bobs not in put.text
    assert structured(await call(fleet, keys["bob"], "keyed__fingerprint"))["sha256"] == sha(bobs)
    assert structured(await call(fleet, keys["alice"], "keyed__fingerprint"))["sha256"] == sha(alices)
    assert [s["name"] for s in api(fleet, keys["bob"], "GET", "/api/secrets").json()["secrets"]] == [TOKEN]
    assert api(fleet, keys["bob"], "DELETE", f"/api/secrets/{KEYED}/{TOKEN}").status_code == 204

    # The tenant-wide value (an admin's) is bob's fallback; alice's own still wins for her.
    shared = value()
    assert api(fleet, keys["admin-1"], "PUT", f"/api/tenant-secrets/{KEYED}/{TOKEN}", json={"value": shared}).status_code == 200
    assert structured(await call(fleet, keys["bob"], "keyed__fingerprint"))["sha256"] == sha(shared)
    assert structured(await call(fleet, keys["alice"], "keyed__fingerprint"))["sha256"] == sha(alices)
    assert api(fleet, keys["admin-1"], "DELETE", f"/api/tenant-secrets/{KEYED}/{TOKEN}").status_code == 204


async def test_rotation_restarts_only_the_server_that_declares_it(vault_fleet):
    fleet, alice = vault_fleet, vault_fleet.keys["alice"]
    secrets_cli(fleet, "set", "alice", KEYED, TOKEN, stdin=value())
    async with connect(fleet.mcp_url, alice) as client:
        for tool in ("keyed__bump", "plain__bump", "keyed__bump", "plain__bump"):
            await client.call_tool(tool, {})
        rotated = value()
        started = time.perf_counter()
        put = api(fleet, alice, "PUT", f"/api/secrets/{KEYED}/{TOKEN}", json={"value": rotated})
        assert put.status_code == 200
        assert structured(await client.call_tool("keyed__fingerprint", {}))["sha256"] == sha(rotated)
        print(f"\nrotation to the server using the new value {(time.perf_counter() - started):.2f} s")
        assert text_of(await client.call_tool("keyed__bump", {})) == "1"  # restarted: its memory is new
        assert text_of(await client.call_tool("plain__bump", {})) == "3"  # its neighbour kept its memory

        # Removed: the server restarts without it and its calls say what to do.
        secrets_cli(fleet, "rm", "alice", KEYED, TOKEN)
        with pytest.raises(MCPError, match=f"secrets set alice {KEYED} {TOKEN}"):
            await client.call_tool("keyed__fingerprint", {})
        assert text_of(await client.call_tool("plain__bump", {})) == "4"
        secrets_cli(fleet, "set", "alice", KEYED, TOKEN, stdin=rotated)
        assert structured(await client.call_tool("keyed__fingerprint", {}))["sha256"] == sha(rotated)
        assert text_of(await client.call_tool("keyed__leak", {})) == "logged"
        assert structured(await client.call_tool("keyed__fingerprint", {}))["sha256"] == sha(rotated)


async def test_a_hibernated_sandbox_keeps_its_memory_and_secrets_only_encrypted(vault_fleet):
    fleet, alice = vault_fleet, vault_fleet.keys["alice"]
    async with connect(fleet.mcp_url, alice) as client:
        keyed = int(text_of(await client.call_tool("keyed__bump", {})))
        plain = int(text_of(await client.call_tool("plain__bump", {})))
    started = time.perf_counter()
    fleet.cli("sandboxes", "hibernate", "alice")
    print(f"\nhibernate with the image sealed {time.perf_counter() - started:.2f} s")
    images = [p for p in fleet.home.glob("sandboxes/*/checkpoint") if p.is_dir()]
    assert len(images) == 1 and (images[0] / "sealed.key").exists()
    assert all(p.name.endswith(".sealed") or p.name == "sealed.key" for p in images[0].rglob("*") if p.is_file())
    assert _files_holding(images[0], VALUES, skip=fleet.home / "openbao") == []
    # Not finding a value proves little alone (the image is compressed): every file is ciphertext,
    # which starts with the magic of a compressed seal and does not compress, unlike runsc's state
    # and memory pages.
    for path in images[0].rglob("*.sealed"):
        head = path.read_bytes()[: 2**20]
        assert head[:4] == b"MFS2" and len(zlib.compress(head)) > 0.99 * len(head), path
    # It resumes from the unsealed image (AES-GCM authenticated: bit for bit what runsc wrote), with
    # every server's memory: the one holding a secret is not restarted by the resume either.
    started = time.perf_counter()
    async with connect(fleet.mcp_url, alice) as client:
        assert text_of(await client.call_tool("keyed__bump", {})) == str(keyed + 1)
        print(f"resume from the sealed image and a call {time.perf_counter() - started:.2f} s")
        assert text_of(await client.call_tool("plain__bump", {})) == str(plain + 1)
        assert structured(await client.call_tool("keyed__fingerprint", {}))["sha256"] == sha(VALUES[-1])
    assert "resumed in" in fleet.log() and "unsealed in" in fleet.log()


def test_changes_are_audited_by_name_never_by_value(vault_fleet):
    with psycopg.connect(vault_fleet.database_url) as conn:
        rows = conn.execute("SELECT action, target, detail::text FROM audit_entries WHERE action LIKE 'secret.%' ORDER BY id").fetchall()
        everything = " ".join(str(r) for r in conn.execute("SELECT * FROM audit_entries").fetchall())
    assert ("secret.set", "default/alice") in {(a, t) for a, t, _ in rows}
    assert ("secret.set", "default (tenant-wide)") in {(a, t) for a, t, _ in rows}
    assert ("secret.remove", "default/bob") in {(a, t) for a, t, _ in rows}
    assert ("secret.remove", "default (tenant-wide)") in {(a, t) for a, t, _ in rows}
    assert all(TOKEN in d or "OTHER" in d for _, _, d in rows)
    assert not any(v in everything for v in VALUES)


def _files_holding(root: Path, needles: list[str], skip: Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if skip in path.parents or not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: value {VALUES.index(n)}" for n in needles if n.encode() in data]
    return found


def test_no_value_in_any_file_under_the_fleet_home_but_openbaos_storage(vault_fleet):
    fleet = vault_fleet
    assert len(VALUES) >= 6
    assert _files_holding(fleet.home, VALUES, skip=fleet.home / "openbao" / "data") == []
    # The careless server's stderr reached its sandbox's console log, redacted.
    logs = "".join(p.read_text(errors="replace") for p in fleet.home.rglob("console.log"))
    assert "token is [redacted]" in logs


async def test_secrets_survive_openbao_restarting_and_vault_down_is_a_clear_error(vault_fleet, tmp_path_factory):
    fleet, alice = vault_fleet, vault_fleet.keys["alice"]
    listed = json.loads(secrets_cli(fleet, "list", "alice", "--json").stdout)
    fleet.stop()  # stops its OpenBao
    assert not (fleet.home / "openbao" / "pid").exists()
    # With no gateway running, the CLI starts the home's OpenBao for itself, and stops it again.
    assert json.loads(secrets_cli(fleet, "list", "alice", "--json").stdout) == listed
    assert not (fleet.home / "openbao" / "pid").exists()
    started = time.perf_counter()
    fleet.start()
    print(f"\ngateway restarted, OpenBao unsealed again, in {time.perf_counter() - started:.1f} s")
    assert json.loads(secrets_cli(fleet, "list", "alice", "--json").stdout) == listed
    got = structured(await call(fleet, alice, "keyed__fingerprint"))["sha256"]
    assert got == sha(VALUES[-1])

    # Vault down: a user whose server never got its values is told so, clearly.
    carol = fleet.add_user("carol")
    os.kill(int((fleet.home / "openbao" / "pid").read_text()), signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(MCPError) as refused:
        await call(fleet, carol, "keyed__fingerprint")
    assert re.search(r"cannot get its secrets: .*cannot be reached", str(refused.value)), str(refused.value)
    # ... while alice's server keeps the values it had, and her other tools work.
    assert structured(await call(fleet, alice, "keyed__fingerprint"))["sha256"] == sha(VALUES[-1])
    assert api(fleet, alice, "PUT", f"/api/secrets/{KEYED}/{TOKEN}", json={"value": "y" * 8}).status_code == 503


def test_the_config_file_written_at_a_sandboxs_start_holds_no_secret(tmp_path):
    """Secrets reach a sandbox over its channel only: `prepare` writes no server that holds any."""
    from sandbox.boot import prepare
    from sandbox.layout import SandboxLayout, drop_channel
    from sandbox.servers import ServerSpec, server_configs

    secret = value()
    keyed = ServerSpec("keyed", ("python", "-m", "x"), server=KEYED, secret_names=(TOKEN,), secrets={TOKEN: secret})
    plain = ServerSpec("plain", ("python", "-m", "y"))
    assert secret not in repr(keyed) and secret not in repr(server_configs([keyed]))
    assert server_configs([keyed])[0].env[TOKEN] == secret  # what `configure` sends over the channel
    layout = SandboxLayout(tmp_path, "sbx-test")
    try:
        prepare(layout, "t" * 32, [keyed, plain], mount_workspace=lambda p: p.mkdir(), provision=lambda p: p.mkdir(),
                uid=os.getuid(), gid=os.getgid())
        written = "".join(p.read_text() for p in layout.dir.rglob("*.json"))
    finally:
        drop_channel(layout)  # a tmpfs of its own
    assert '"plain"' in written and '"keyed"' not in written and secret not in written
