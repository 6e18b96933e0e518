"""`mcpfleet init`: a new tool project that builds, passes its tests and runs in a sandbox as it is.

The project is a plain `mcp` server: server.json (the official registry's format, with
mcpfleet's block in `_meta`), a hatchling pyproject.toml whose console script starts the
server on stdio, one example tool, a test through the `tool_server` fixture, and a README.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

SERVER_SCHEMA = "https://static.modelcontextprotocol.io/schemas/2025-10-17/server.schema.json"
MCP_REQUIREMENT = "mcp==2.3.0"
"""The SDK the sandboxes provide; a server that needs another version would not find it there."""


class ScaffoldError(RuntimeError):
    """Nothing was written; the message says why."""


@dataclass(frozen=True)
class Names:
    """What a server's name gives the project: `io.example/weather` -> prefix `weather`,
    distribution and console script `weather-mcp`, package `weather_mcp`."""

    name: str
    prefix: str
    distribution: str
    package: str

    @classmethod
    def of(cls, name: str, prefix: str) -> Names:
        return cls(name=name, prefix=prefix, distribution=f"{prefix.replace('_', '-')}-mcp", package=f"{prefix}_mcp")


def manifest_document(names: Names, description: str, version: str = "0.1.0") -> dict:
    return {
        "$schema": SERVER_SCHEMA,
        "name": names.name,
        "description": description,
        "version": version,
        "packages": [
            {
                "registryType": "pypi",
                "identifier": names.distribution,
                "version": version,
                "transport": {"type": "stdio"},
            }
        ],
        "_meta": {"io.mcpfleet": {"egress": [], "secrets": [], "memory_mb": 512, "cpus": 0.5}},
    }


PYPROJECT = Template('''\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "$distribution"
version = "$version"
description = $description
requires-python = ">=3.11"
dependencies = ["$mcp"]

[project.optional-dependencies]
# The tool_server fixture comes with mcpfleet (its pytest plugin); install mcpfleet alongside.
test = ["pytest>=8", "pytest-asyncio>=0.24"]

[project.scripts]
$distribution = "$package.server:main"

[tool.hatch.build.targets.wheel]
packages = ["$package"]

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
''')

SERVER = Template('''\
"""The $prefix MCP server: tools that clients see as `${prefix}__<tool>`."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("$prefix", instructions=$description)


@server.tool(description="Say hello to someone by name")
def hello(name: str) -> str:
    return f"Hello, {name}!"


def main() -> None:
    """The console script: serve on stdio, as the fleet's sandboxes run it."""
    server.run()
''')

TEST = '''\
"""The server as a client sees it: `tool_server` is an MCP client session on the server's stdio."""


async def test_lists_its_tools(tool_server):
    tools = (await tool_server.list_tools()).tools
    assert [tool.name for tool in tools] == ["hello"]
    assert tools[0].description == "Say hello to someone by name"


async def test_hello(tool_server):
    result = await tool_server.call_tool("hello", {"name": "Ada"})
    assert not result.is_error
    assert result.content[0].text == "Hello, Ada!"
'''

README = Template('''\
# $name

$description

An MCP server for mcpfleet. Its tools reach users as `${prefix}__<tool>`.

## Layout

- `server.json`: the manifest (the MCP registry's format). mcpfleet's own needs go in
  `_meta["io.mcpfleet"]`: `egress` (the hosts the server may connect to; none by default),
  `secrets` (names of the environment variables it reads secrets from), `memory_mb`, `cpus`,
  and `command` when the console script is not named like the package.
- `pyproject.toml`: the Python project; its console script `$distribution` serves MCP on stdio.
- `$package/server.py`: the server, written with the plain `mcp` SDK.
- `tests/`: tests through a real MCP client (`tool_server`, from mcpfleet's pytest plugin).

## Develop

```
pip install -e '.[test]'       # in an environment that also has mcpfleet
pytest                         # runs the server from the sources, over stdio
mcpfleet dev .                 # builds the wheel, runs it in a gVisor sandbox, lists its tools
mcpfleet dev . --call hello --args '{"name": "Ada"}'
```

## Secrets

List the names in `_meta["io.mcpfleet"]["secrets"]` and read them in the server with
`mcpfleet_sdk.secret("NAME")`. The fleet passes each declared secret as an environment
variable; the tests take it from `MCPFLEET_TEST_SECRET_NAME`.

## Publish

Bump `version` in server.json (both places) and pyproject.toml, then:

```
MCPFLEET_URL=https://fleet.example MCPFLEET_KEY=... mcpfleet publish .
```

The registry validates the version (schema, a scan of the tool definitions, a trial run in
a sandbox); an admin approves it before users see its tools.
''')

GITIGNORE = """\
__pycache__/
*.egg-info/
build/
dist/
.venv/
.pytest_cache/
"""


def _validated(name: str, description: str) -> Names:
    """The names, once the manifest they give is one the registry accepts (raises ScaffoldError)."""
    from registry.manifest import ManifestError, parse_manifest

    probe = Names.of(name, "probe")
    try:
        manifest = parse_manifest(manifest_document(probe, description))
    except ManifestError as exc:
        raise ScaffoldError("\n".join(["the project's server.json would not be valid:", *(f"  - {p}" for p in exc.problems)])) from None
    return Names.of(name, manifest.prefix)


def create_project(directory: Path, name: str, description: str | None = None) -> Names:
    """Write a new tool project into `directory` (absent or empty)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ScaffoldError(f"{directory} is not empty; choose a new directory")
    description = description or f"MCP tools of {name}"
    names = _validated(name, description)
    values = {
        "name": name,
        "prefix": names.prefix,
        "distribution": names.distribution,
        "package": names.package,
        "version": "0.1.0",
        # json.dumps makes a string literal that TOML and Python both read as written.
        "description": json.dumps(description),
        "mcp": MCP_REQUIREMENT,
    }
    files = {
        "server.json": json.dumps(manifest_document(names, description), indent=2) + "\n",
        "pyproject.toml": PYPROJECT.substitute(values),
        f"{names.package}/__init__.py": "",
        f"{names.package}/server.py": SERVER.substitute(values),
        "tests/test_server.py": TEST,
        "README.md": README.substitute(values, description=description),
        ".gitignore": GITIGNORE,
    }
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return names
