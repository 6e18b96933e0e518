"""The SDK for tool developers: `mcpfleet init`, the `tool_server` fixture, `secret()`,
`mcpfleet dev` in a real gVisor sandbox and `mcpfleet publish` against a real gateway."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mcpfleet_sdk
from mcpfleet_sdk.api import FleetApi, FleetApiError
from mcpfleet_sdk.scaffold import create_project
from mcpfleet_sdk.secrets import DECLARED_ENV, SecretError
from tests.conftest import MCPFLEET, ROOT, Fleet

WEATHER = ROOT / "tests" / "tool_projects" / "weather"
OSLO = {
    "city": "Oslo",
    "days": [
        {"day": 0, "condition": "sunny", "high_c": 13, "low_c": 7},
        {"day": 1, "condition": "rain", "high_c": 13, "low_c": 3},
        {"day": 2, "condition": "snow", "high_c": 10, "low_c": 1},
    ],
}
needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point the SDK at another project."""
    env = {k: v for k, v in os.environ.items() if k not in ("MCPFLEET_PROJECT", DECLARED_ENV, "PYTEST_ADDOPTS")}
    env = {k: v for k, v in env.items() if not k.startswith("MCPFLEET_TEST_SECRET_")}
    return {**env, **extra}


def run_pytest(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The project's own test suite, as its developer runs it (cwd = the project)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project, env=clean_env(**env), capture_output=True, text=True, timeout=180,
    )


def mcpfleet(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MCPFLEET, *args], env=clean_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project exactly as `mcpfleet init` writes it."""
    directory = tmp_path_factory.mktemp("init") / "greeter"
    done = mcpfleet("init", str(directory), "--name", "io.example/greeter", "--description", "Greets people")
    assert done.returncode == 0, done.stderr
    assert "greeter__<tool>" in done.stdout
    return directory


def derived_project(tmp_path: Path, server_code: str, test_code: str, secrets_declared: tuple[str, ...] = ()) -> Path:
    """A fresh `init` project whose server and test are replaced (and which may declare secrets)."""
    directory = tmp_path / "derived"
    create_project(directory, "io.example/derived", "A project changed by a test")
    (directory / "derived_mcp" / "server.py").write_text(server_code)
    (directory / "tests" / "test_server.py").write_text(test_code)
    manifest = json.loads((directory / "server.json").read_text())
    manifest["_meta"]["io.mcpfleet"]["secrets"] = list(secrets_declared)
    (directory / "server.json").write_text(json.dumps(manifest, indent=2))
    return directory


# -- mcpfleet init ------------------------------------------------------------------------------


def test_init_writes_a_project_that_passes_its_own_tests(generated: Path) -> None:
    files = sorted(str(p.relative_to(generated)) for p in generated.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert files == [
        ".gitignore", "README.md", "greeter_mcp/__init__.py", "greeter_mcp/server.py", "pyproject.toml",
        "server.json", "tests/test_server.py",
    ]
    manifest = mcpfleet_sdk.manifest(generated)
    assert (manifest.name, manifest.prefix, manifest.package, manifest.command) == (
        "io.example/greeter", "greeter", "greeter-mcp", "greeter-mcp",
    )
    assert json.loads((generated / "server.json").read_text())["$schema"].startswith("https://static.modelcontextprotocol.io/")
    done = run_pytest(generated)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_init_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    done = mcpfleet("init", str(tmp_path), "--name", "io.example/weather")
    assert done.returncode == 1
    assert "is not empty" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_init_refuses_a_name_the_registry_would_refuse(tmp_path: Path) -> None:
    target = tmp_path / "new"
    done = mcpfleet("init", str(target), "--name", "weather")
    assert done.returncode == 1
    assert "reverse-DNS" in done.stderr
    assert not target.exists()


# -- the tool_server fixture --------------------------------------------------------------------


@pytest.fixture
def tool_project() -> Path:
    """The plugin's fixture, pointed at the sample project (this suite's rootdir is the fleet's)."""
    return WEATHER


async def test_tool_server_lists_and_calls_the_tools(tool_server) -> None:
    tools = {tool.name: tool.description for tool in (await tool_server.list_tools()).tools}
    assert tools == {
        "forecast": "Get the weather forecast for a city",
        "alerts": "List the active weather alerts for a region",
    }
    result = await tool_server.call_tool("forecast", {"city": "Oslo"})
    assert not result.is_error
    assert result.structured_content == OSLO
    alerts = await tool_server.call_tool("alerts", {"region": "Alps"})
    assert alerts.structured_content == {"region": "Alps", "alerts": ["high wind warning"]}


SECRET_SERVER = '''\
from mcp.server.mcpserver import MCPServer
from mcpfleet_sdk import secret

server = MCPServer("derived")


@server.tool(description="Greet with the configured greeting")
def greet(name: str) -> str:
    return f"{secret('GREETING')}, {name}"


@server.tool(description="Read a secret that server.json does not declare")
def leak() -> str:
    return secret("OTHER_TOKEN")


def main() -> None:
    server.run()
'''

SECRET_TEST = '''\
async def test_greet(tool_server):
    result = await tool_server.call_tool("greet", {"name": "Ada"})
    assert result.content[0].text == "Bonjour, Ada"


async def test_undeclared(tool_server):
    result = await tool_server.call_tool("leak", {})
    assert result.is_error
    text = result.content[0].text
    assert "OTHER_TOKEN" in text and "is not declared" in text and "GREETING" in text
'''


def test_tool_server_passes_declared_secrets_and_fails_clearly_without_them(tmp_path: Path) -> None:
    project = derived_project(tmp_path, SECRET_SERVER, SECRET_TEST, ("GREETING",))

    without = run_pytest(project, GREETING="ignored: only MCPFLEET_TEST_SECRET_GREETING counts")
    assert without.returncode == 1
    assert "2 errors" in without.stdout
    assert "set MCPFLEET_TEST_SECRET_GREETING" in without.stdout

    # OTHER_TOKEN is in the developer's environment but undeclared: the server neither gets nor reads it.
    passing = run_pytest(project, MCPFLEET_TEST_SECRET_GREETING="Bonjour", MCPFLEET_TEST_SECRET_OTHER_TOKEN="x")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "2 passed" in passing.stdout


def test_tool_server_shows_why_the_server_did_not_start(tmp_path: Path) -> None:
    broken = "raise RuntimeError('no forecast service configured')\n"
    project = derived_project(tmp_path, broken, "async def test_any(tool_server):\n    pass\n")
    done = run_pytest(project)
    assert done.returncode == 1
    assert "did not start" in done.stdout
    assert "RuntimeError: no forecast service configured" in done.stdout


# -- secret(), declared(), manifest() -----------------------------------------------------------


def test_secret_returns_a_declared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECLARED_ENV, "WEATHER_API_KEY,OTHER")
    monkeypatch.setenv("WEATHER_API_KEY", "k-123")
    assert mcpfleet_sdk.secret("WEATHER_API_KEY") == "k-123"


def test_secret_refuses_an_undeclared_name_without_showing_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECLARED_ENV, "WEATHER_API_KEY")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-very-secret")
    with pytest.raises(SecretError) as caught:
        mcpfleet_sdk.secret("GITHUB_TOKEN")
    message = str(caught.value)
    assert "'GITHUB_TOKEN' is not declared" in message
    assert '_meta["io.mcpfleet"]["secrets"]' in message
    assert "WEATHER_API_KEY" in message
    assert "ghp-very-secret" not in message


def test_secret_names_the_variable_when_it_is_declared_but_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DECLARED_ENV, "WEATHER_API_KEY")
    monkeypatch.delenv("WEATHER_API_KEY", raising=False)
    with pytest.raises(SecretError, match="environment variable WEATHER_API_KEY is missing") as caught:
        mcpfleet_sdk.secret("WEATHER_API_KEY")
    assert "MCPFLEET_TEST_SECRET_WEATHER_API_KEY" in str(caught.value)
    monkeypatch.setenv("WEATHER_API_KEY", "")
    with pytest.raises(SecretError, match="missing or empty"):
        mcpfleet_sdk.secret("WEATHER_API_KEY")


def test_secret_checks_the_projects_manifest_when_run_from_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DECLARED_ENV, raising=False)
    monkeypatch.setenv("MCPFLEET_PROJECT", str(WEATHER))
    monkeypatch.setenv("WEATHER_API_KEY", "k-123")
    with pytest.raises(SecretError, match=r"not declared: .* \(declared: none\)"):
        mcpfleet_sdk.secret("WEATHER_API_KEY")


def test_declared_and_manifest_read_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(WEATHER / "weather_tool")  # found from a directory inside the project
    monkeypatch.delenv("MCPFLEET_PROJECT", raising=False)
    fleet = mcpfleet_sdk.declared()
    assert (fleet.egress, fleet.secrets, fleet.memory_mb, fleet.cpus) == ((), (), 512, 0.5)
    manifest = mcpfleet_sdk.manifest()
    assert (manifest.name, manifest.version, manifest.prefix, manifest.command) == (
        "io.example/weather", "1.0.0", "weather", "weather-tool",
    )


# -- mcpfleet dev -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_env(home: Path) -> dict[str, str]:
    return {"MCPFLEET_HOME": str(home)}


@needs_runsc
def test_dev_runs_the_weather_project_in_a_sandbox_and_calls_forecast(dev_env: dict[str, str]) -> None:
    done = mcpfleet("dev", str(WEATHER), "--call", "forecast", "--args", '{"city": "Oslo"}', **dev_env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "weather__forecast\tGet the weather forecast for a city",
        "weather__alerts\tList the active weather alerts for a region",
    ]
    assert lines[2].startswith("started in ") and " ms, memory " in lines[2] and lines[2].endswith(" MiB")
    assert json.loads("\n".join(lines[4:])) == OSLO
    # Not silent while it works: progress on stderr, in order, stdout left to the tools.
    progress = done.stderr.splitlines()
    assert progress[0] == "building the wheel of io.example/weather 1.0.0"
    assert progress[1] == "built weather_tool-1.0.0-py3-none-any.whl; starting it in a gVisor sandbox"


@needs_runsc
def test_dev_runs_a_generated_project_as_it_is(generated: Path, dev_env: dict[str, str]) -> None:
    done = mcpfleet("dev", str(generated), "--call", "hello", "--args", '{"name": "Ada"}', **dev_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "greeter__hello\tSay hello to someone by name"
    assert done.stdout.rstrip().endswith("Hello, Ada!")


@needs_runsc
def test_dev_gives_the_server_its_declared_secrets_and_the_sdk(tmp_path: Path, dev_env: dict[str, str]) -> None:
    project = derived_project(tmp_path, SECRET_SERVER, "", ("GREETING",))
    done = mcpfleet(
        "dev", str(project), "--call", "greet", "--args", '{"name": "Ada"}', MCPFLEET_TEST_SECRET_GREETING="Hej", **dev_env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip().endswith("Hej, Ada")


@needs_runsc
def test_dev_exits_1_when_the_server_does_not_start(tmp_path: Path, dev_env: dict[str, str]) -> None:
    project = derived_project(tmp_path, "raise SystemExit('no forecast service configured')\n", "")
    done = mcpfleet("dev", str(project), **dev_env)
    assert done.returncode == 1
    assert "did not start" in done.stderr
    assert "no forecast service configured" in done.stderr  # what the server said on its way out
    assert done.stdout == ""


def test_dev_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    (tmp_path / "server.json").write_text('{"name": "weather", "version": "1", "description": "", "packages": []}')
    done = mcpfleet("dev", str(tmp_path))
    assert done.returncode == 1
    assert "server.json is not valid" in done.stderr
    assert "reverse-DNS" in done.stderr


# -- mcpfleet publish ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def publisher(fleet: Fleet) -> dict[str, str]:
    """A publisher in a tenant of its own, so that versions published elsewhere in the run do not collide."""
    tenant = f"sdk-{secrets.token_hex(4)}"
    key = fleet.add_user("dev", tenant=tenant, role="publisher")
    return {"MCPFLEET_URL": fleet.base_url, "MCPFLEET_KEY": key}


@needs_runsc
def test_publish_uploads_the_weather_project_and_reports_validation(publisher: dict[str, str]) -> None:
    done = mcpfleet("publish", str(WEATHER), "--wait", "240", **publisher)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "built weather_tool-1.0.0-py3-none-any.whl" in done.stdout
    assert done.stdout.startswith("publishing io.example/weather 1.0.0 as ")  # the key was checked first
    assert "waiting up to 240 s for validation" in done.stdout
    assert "io.example/weather 1.0.0: validating (/registry/v1/servers/io.example/weather/versions/1.0.0)" in done.stdout
    assert "validation of io.example/weather 1.0.0: passed" in done.stdout
    assert "FAIL" not in done.stdout

    with FleetApi(publisher["MCPFLEET_URL"], publisher["MCPFLEET_KEY"]) as api:
        version = api.request("GET", "/registry/v1/servers/io.example/weather/versions/1.0.0").json()
    assert version["status"] == "passed"
    assert sorted(tool["name"] for tool in version["tools"]) == ["alerts", "forecast"]

    again = mcpfleet("publish", str(WEATHER), "--no-wait", **publisher)
    assert again.returncode == 2
    assert "409" in again.stderr


def test_publish_exits_2_with_the_gateways_message_when_refused(fleet: Fleet, generated: Path) -> None:
    done = mcpfleet("publish", str(generated), "--no-wait", MCPFLEET_URL=fleet.base_url, MCPFLEET_KEY="mcpf_not-a-key")
    assert done.returncode == 2
    # Said in terms of what to set, and before the wheel is built: nothing was built or uploaded.
    assert "401: the gateway refused the API key" in done.stderr and "set MCPFLEET_KEY, or pass --key" in done.stderr
    assert "built " not in done.stdout and "building" not in done.stdout
    assert "mcpf_not-a-key" not in done.stdout + done.stderr

    missing = mcpfleet("publish", str(generated), "--no-wait", MCPFLEET_URL=fleet.base_url)
    assert missing.returncode == 2
    assert "no API key was given" in missing.stderr and "MCPFLEET_KEY" in missing.stderr

    # A member's key is refused before the build too, naming the role to ask for.
    member = fleet.add_user(f"member-{secrets.token_hex(3)}", role="member")
    refused = mcpfleet("publish", str(generated), "--no-wait", MCPFLEET_URL=fleet.base_url, MCPFLEET_KEY=member)
    assert refused.returncode == 2
    assert "publishing needs a publisher's or an admin's key" in refused.stderr and "users role" in refused.stderr
    assert "built " not in refused.stdout

    # The client the registry commands share: the gateway's own message, whatever the status.
    with FleetApi.from_env({"MCPFLEET_URL": fleet.base_url, "MCPFLEET_KEY": member}) as api:
        with pytest.raises(FleetApiError) as caught:
            api.request("POST", "/registry/v1/publish", data={"manifest": "{}"}, files={"wheel": ("x.whl", b"")})
    assert caught.value.status == 403
    assert caught.value.message.startswith("role 'member' may not do this")


def test_publish_checks_the_project_before_uploading(tmp_path: Path, generated: Path, publisher: dict[str, str]) -> None:
    project = tmp_path / "mismatch"
    shutil.copytree(generated, project)
    manifest = json.loads((project / "server.json").read_text())
    manifest["version"] = manifest["packages"][0]["version"] = "0.2.0"  # pyproject.toml still says 0.1.0
    (project / "server.json").write_text(json.dumps(manifest))
    done = mcpfleet("publish", str(project), **publisher)
    assert done.returncode == 1
    assert "the wheel is version 0.1.0 but server.json's package says 0.2.0" in done.stderr
    assert "uploading" not in done.stdout
    with FleetApi(publisher["MCPFLEET_URL"], publisher["MCPFLEET_KEY"]) as api:
        names = [s["name"] for s in api.request("GET", "/registry/v1/servers").json()["servers"]]
    assert "io.example/greeter" not in names


def test_publish_says_it_cannot_reach_the_gateway_before_building(generated: Path) -> None:
    done = mcpfleet("publish", str(generated), MCPFLEET_URL="http://127.0.0.1:9", MCPFLEET_KEY="mcpf_unused")
    assert done.returncode == 2
    assert "cannot reach the gateway at http://127.0.0.1:9" in done.stderr
    assert "is `mcpfleet up` running?" in done.stderr and "--url" in done.stderr
    assert "built " not in done.stdout


def test_fleet_api_reports_an_unreachable_gateway() -> None:
    with FleetApi("http://127.0.0.1:9", "mcpf_secret") as api, pytest.raises(FleetApiError) as caught:
        api.request("GET", "/registry/v1/servers")
    assert caught.value.status is None
    assert "cannot reach the gateway at http://127.0.0.1:9" in str(caught.value)
    assert "mcpf_secret" not in str(caught.value)
