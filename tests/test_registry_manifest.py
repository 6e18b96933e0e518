"""server.json as the registry accepts it: what a good one gives, and what each mistake says."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from registry.artifacts import server_spec
from registry.manifest import MANIFEST_SCHEMA, FleetMeta, ManifestError, load_manifest, parse_manifest
from sandbox.servers import server_configs


def manifest(**changes: Any) -> dict[str, Any]:
    """A valid server.json; `changes` replace top-level fields (None removes one)."""
    document: dict[str, Any] = {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": "io.example/weather",
        "title": "Weather",
        "description": "Forecasts and alerts for any city",
        "version": "1.2.0",
        "repository": {"url": "https://github.com/example/weather", "source": "github"},
        "websiteUrl": "https://weather.example.io",
        "packages": [
            {
                "registryType": "pypi",
                "identifier": "weather-mcp",
                "version": "1.2.0",
                "transport": {"type": "stdio"},
                "environmentVariables": [{"name": "WEATHER_API_KEY", "isSecret": True, "isRequired": True}],
            }
        ],
        "_meta": {
            "io.modelcontextprotocol.registry/publisher-provided": {"tool": "ci"},
            "io.mcpfleet": {
                "command": "weather-server",
                "egress": ["API.Weather.example:443", "tiles.weather.example"],
                "secrets": ["WEATHER_API_KEY"],
                "memory_mb": 256,
                "cpus": 1,
            },
        },
    }
    for key, value in changes.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return document


def problems_of(document: Any) -> list[str]:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(document)
    assert raised.value.problems, "a ManifestError always says why"
    return raised.value.problems


def fleet(**block: Any) -> dict[str, Any]:
    return {"io.mcpfleet": block}


def test_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(MANIFEST_SCHEMA)


def test_a_full_manifest() -> None:
    document = manifest()
    parsed = parse_manifest(document)
    assert parsed.name == "io.example/weather"
    assert parsed.version == "1.2.0"
    assert parsed.description == "Forecasts and alerts for any city"
    assert parsed.prefix == "weather"
    assert parsed.package == "weather-mcp"
    assert parsed.command == "weather-server"
    assert parsed.fleet == FleetMeta(
        egress=("api.weather.example:443", "tiles.weather.example"),
        secrets=("WEATHER_API_KEY",),
        memory_mb=256,
        cpus=1.0,
    )
    assert isinstance(parsed.fleet.cpus, float)
    assert parsed.raw == document
    document["name"] = "io.example/changed"
    assert parsed.raw["name"] == "io.example/weather", "the manifest keeps its own copy"


def test_a_minimal_manifest_defaults() -> None:
    parsed = parse_manifest(
        {
            "name": "io.github.someone/Tide-Tables.v2",
            "description": "Tides",
            "version": "0.1.0",
            "packages": [{"registryType": "pypi", "identifier": "tide_tables", "transport": {"type": "stdio"}}],
        }
    )
    assert parsed.prefix == "tide_tables_v2"
    assert parsed.package == parsed.command == "tide_tables"
    assert parsed.fleet == FleetMeta(egress=(), secrets=(), memory_mb=None, cpus=None)
    assert parsed.fleet.inference is False


def test_a_manifest_declaring_inference_reaches_the_servers_spec_and_supervisor_config() -> None:
    document = manifest()
    document["_meta"]["io.mcpfleet"]["inference"] = True
    parsed = parse_manifest(document)
    assert parsed.fleet.inference is True
    spec = server_spec("weather", "ab" * 32, "weather:main", parsed.fleet.secrets, parsed.name,
                       egress=parsed.fleet.egress, inference=parsed.fleet.inference)
    [config] = server_configs([spec])
    assert spec.inference and config.inference
    assert not server_configs([server_spec("weather", "ab" * 32, "weather:main")])[0].inference


def test_the_pypi_stdio_entry_is_chosen_among_others() -> None:
    parsed = parse_manifest(
        manifest(
            packages=[
                {"registryType": "npm", "identifier": "@example/weather", "version": "1.2.0", "transport": {"type": "stdio"}},
                {"registryType": "oci", "identifier": "docker.io/example/weather", "transport": {"type": "streamable-http", "url": "http://localhost:8080/mcp"}},
                {"registryType": "pypi", "identifier": "weather-mcp", "version": "1.2.0", "transport": {"type": "stdio"}},
            ],
            _meta=fleet(secrets=["WEATHER_API_KEY"]),
        )
    )
    assert parsed.package == parsed.command == "weather-mcp"


def test_load_manifest_reads_server_json(tmp_path: Path) -> None:
    (tmp_path / "server.json").write_text(json.dumps(manifest()), encoding="utf-8")
    assert load_manifest(tmp_path).name == "io.example/weather"


def test_load_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as raised:
        load_manifest(tmp_path)
    assert raised.value.problems == [f"server.json is missing from {tmp_path}"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"name": "io.example/x",', "server.json is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 25"),
        (b'["not", "an", "object"]', "server.json must be a JSON object"),
        (b'{"name": "caf\xe9"}', "server.json is not UTF-8 text (byte 13)"),
    ],
)
def test_load_manifest_unreadable(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "server.json").write_bytes(content)
    with pytest.raises(ManifestError) as raised:
        load_manifest(tmp_path)
    assert raised.value.problems == [expected]
    assert expected in str(raised.value)


@pytest.mark.parametrize("field", ["name", "description", "version", "packages"])
def test_required_fields(field: str) -> None:
    assert f"{field} is required" in problems_of(manifest(**{field: None}))


def test_missing_package_fields_are_named_with_their_path() -> None:
    problems = problems_of(manifest(packages=[{"registryType": "pypi"}]))
    assert "packages[0].identifier is required" in problems
    assert "packages[0].transport is required" in problems


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weather", "name 'weather' must be in reverse-DNS form"),
        ("io.example/weather/extra", "name 'io.example/weather/extra' must be in reverse-DNS form"),
        ("io.example/wea ther", "name 'io.example/wea ther' must be in reverse-DNS form"),
        ("example/weather", "name 'example/weather' must start with a reverse-DNS namespace containing a dot"),
        ("io.example/9lives", "name 'io.example/9lives' gives the tool prefix '9lives', which must start with a letter"),
        ("io.example/" + "w" * 33, f"gives the tool prefix '{'w' * 33}', which must start with a letter and have at most 32"),
        ("io.example/a__b", "name 'io.example/a__b' gives the tool prefix 'a__b', which must not contain '__'"),
        ("io.example/a-.b", "gives the tool prefix 'a__b', which must not contain '__'"),
        ("io.example/weather-", "gives the tool prefix 'weather_', which must not contain '__' or end with '_'"),
    ],
)
def test_bad_names(name: str, expected: str) -> None:
    problems = problems_of(manifest(name=name))
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("version", ["^1.2.0", "~1.2", ">=1.0", "1.x", "1.*", "latest", "1.0 - 2.0"])
def test_version_ranges_are_refused(version: str) -> None:
    problems = problems_of(manifest(version=version))
    assert f"version {version!r} must be a specific PEP 440 version such as '1.2.0' (no ranges, wildcards or 'latest')" in problems


def test_package_version_must_equal_the_version() -> None:
    document = manifest()
    document["packages"][0]["version"] = "1.3.0"
    assert problems_of(document) == ["packages[0].version '1.3.0' must equal the top-level version '1.2.0'"]


def test_package_version_equal_under_pep_440_is_accepted() -> None:
    document = manifest(version="1.2.0-alpha.1")
    document["packages"][0]["version"] = "1.2.0a1"
    assert parse_manifest(document).version == "1.2.0-alpha.1"


def test_package_version_latest_is_refused() -> None:
    document = manifest()
    document["packages"][0]["version"] = "latest"
    assert "packages[0].version must be a specific version, not 'latest'" in problems_of(document)


def test_transport_must_be_stdio() -> None:
    document = manifest()
    document["packages"][0]["transport"] = {"type": "streamable-http", "url": "http://localhost:8000/mcp"}
    assert problems_of(document) == ["packages[0].transport.type must be 'stdio'"]


def test_unknown_transport_type() -> None:
    document = manifest()
    document["packages"][0]["transport"] = {"type": "carrier-pigeon"}
    assert problems_of(document) == ["packages[0].transport.type must be 'stdio' or 'streamable-http' or 'sse', not 'carrier-pigeon'"]


def test_a_pypi_package_is_required() -> None:
    document = manifest(packages=[{"registryType": "oci", "identifier": "example/weather", "transport": {"type": "stdio"}}])
    assert problems_of(document) == [
        "packages must include an entry with registryType 'pypi' (mcpfleet runs Python servers, and npm servers "
        "added with `mcpfleet registry add npm:NAME`; found 'oci')"
    ]


def test_two_runnable_packages_are_ambiguous() -> None:
    entry = {"registryType": "pypi", "identifier": "weather-mcp", "transport": {"type": "stdio"}}
    problems = problems_of(manifest(packages=[entry, {**entry, "identifier": "weather-mcp-extra"}]))
    assert problems == ["packages must have exactly one 'pypi' entry with stdio transport, not 2 (packages[0], packages[1])"]


def test_empty_packages() -> None:
    assert problems_of(manifest(packages=[])) == ["packages must have at least 1 entry"]


@pytest.mark.parametrize("identifier", ["-weather", "weather mcp", "weather/mcp", "@example/weather"])
def test_identifier_must_be_a_distribution_name(identifier: str) -> None:
    document = manifest()
    document["packages"][0]["identifier"] = identifier
    document["_meta"]["io.mcpfleet"]["command"] = "weather-server"
    assert problems_of(document) == [
        f"packages[0].identifier {identifier!r} must be a Python distribution name (letters, digits, '.', '_' and '-')"
    ]


def test_arguments_are_not_supported() -> None:
    document = manifest()
    document["packages"][0]["packageArguments"] = [{"type": "named", "name": "--port", "value": "8080"}]
    assert problems_of(document) == [
        "packages[0].packageArguments is not supported: mcpfleet starts the console script without arguments"
    ]


def test_required_secret_variables_must_be_declared() -> None:
    document = manifest()
    document["_meta"]["io.mcpfleet"]["secrets"] = []
    assert problems_of(document) == [
        "packages[0].environmentVariables[0] (WEATHER_API_KEY) is a required secret, so _meta['io.mcpfleet'].secrets must list it"
    ]


def test_description_length() -> None:
    assert problems_of(manifest(description="x" * 101)) == ["description must have at most 100 characters (it has 101)"]
    assert problems_of(manifest(description="")) == ["description must not be empty"]


def test_wrong_types_name_the_field() -> None:
    problems = problems_of(manifest(version=2, packages={"registryType": "pypi"}))
    assert "version must be a string" in problems
    assert "packages must be a list" in problems


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"egres": ["a.example"]}, "_meta['io.mcpfleet'] has unknown field(s) 'egres'; known fields are command, egress, inference, secrets, memory_mb, cpus"),
        ({"inference": "yes"}, "_meta['io.mcpfleet'].inference must be"),
        ({"command": "python -m weather"}, "_meta['io.mcpfleet'].command 'python -m weather' must be the name of a console script"),
        ({"command": "/bin/sh"}, "_meta['io.mcpfleet'].command '/bin/sh' must be the name of a console script"),
        ({"egress": ["localhost"]}, "_meta['io.mcpfleet'].egress[0] 'localhost' must be a host name with an optional port"),
        ({"egress": ["https://api.example.com"]}, "_meta['io.mcpfleet'].egress[0] 'https://api.example.com' must be a host name"),
        ({"egress": ["10.0.0.7"]}, "_meta['io.mcpfleet'].egress[0] '10.0.0.7' must be a host name, not an IP address"),
        ({"egress": ["a.example:70000"]}, "_meta['io.mcpfleet'].egress[0] 'a.example:70000' has port 70000, which must be between 1 and 65535"),
        ({"egress": ["a.example", "a.example"]}, "_meta['io.mcpfleet'].egress must not list the same value twice"),
        ({"secrets": ["weather_key"]}, "_meta['io.mcpfleet'].secrets[0] 'weather_key' must be an environment variable name in UPPER_SNAKE_CASE"),
        ({"secrets": ["LD_PRELOAD"]}, "_meta['io.mcpfleet'].secrets[0] 'LD_PRELOAD' is a variable the runtime itself uses; choose another name"),
        ({"memory_mb": 8}, "_meta['io.mcpfleet'].memory_mb must be at least 16, not 8"),
        ({"memory_mb": 256.5}, "_meta['io.mcpfleet'].memory_mb must be an integer"),
        ({"cpus": 0}, "_meta['io.mcpfleet'].cpus must be more than 0, not 0"),
        ({"cpus": "2"}, "_meta['io.mcpfleet'].cpus must be a number"),
    ],
)
def test_fleet_block_problems(block: dict[str, Any], expected: str) -> None:
    document = manifest()
    document["_meta"]["io.mcpfleet"] = {"secrets": ["WEATHER_API_KEY"], **block}
    problems = problems_of(document)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    document = manifest(name="weather", description="x" * 120, version="^1.0")
    document["packages"][0].update(version="latest", transport={"type": "sse", "url": "http://localhost/sse"})
    document["_meta"]["io.mcpfleet"] = {"secrets": ["WEATHER_API_KEY", "PATH"], "egress": ["192.168.1.1"], "cpus": -1}
    problems = problems_of(document)
    expected = [
        "name 'weather' must be in reverse-DNS form",
        "description must have at most 100 characters",
        "version '^1.0' must be a specific PEP 440 version",
        "packages[0].version must be a specific version, not 'latest'",
        "packages[0].transport.type must be 'stdio'",
        "_meta['io.mcpfleet'].secrets[1] 'PATH' is a variable the runtime itself uses",
        "_meta['io.mcpfleet'].egress[0] '192.168.1.1' must be a host name, not an IP address",
        "_meta['io.mcpfleet'].cpus must be more than 0",
    ]
    for sentence in expected:
        assert any(problem.startswith(sentence) for problem in problems), (sentence, problems)
    assert len(problems) == len(expected), problems
    with pytest.raises(ManifestError, match=r"^server.json has 8 problems: "):
        parse_manifest(document)


def test_the_official_npm_example_needs_only_its_secret_declared() -> None:
    """The registry's own example (docs/reference/server-json/examples/valid/with-package.json)."""
    example = {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json",
        "name": "io.github.user/local-weather",
        "description": "Local MCP server distributed as an npm package.",
        "version": "1.0.0",
        "packages": [
            {
                "registryType": "npm",
                "identifier": "@modelcontextprotocol/server-weather",
                "version": "1.0.0",
                "transport": {"type": "stdio"},
                "runtimeHint": "npx",
                "environmentVariables": [{"name": "API_KEY", "isSecret": True, "isRequired": True}],
            }
        ],
    }
    # An npm package is run (`registry add npm:` packs it with its launcher); its required secret must be declared.
    assert problems_of(example) == [
        "packages[0].environmentVariables[0] (API_KEY) is a required secret, so _meta['io.mcpfleet'].secrets must list it"
    ]
    declared = {**copy.deepcopy(example), "_meta": fleet(secrets=["API_KEY"])}
    assert parse_manifest(declared).package == "@modelcontextprotocol/server-weather"
    as_python = copy.deepcopy(example)
    as_python["packages"][0].update(registryType="pypi", identifier="local-weather", runtimeHint="uvx")
    as_python["_meta"] = fleet(secrets=["API_KEY"])
    assert parse_manifest(as_python).prefix == "local_weather"
