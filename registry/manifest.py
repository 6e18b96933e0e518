"""A tool project's manifest: the official MCP registry's `server.json`, the subset mcpfleet runs.

mcpfleet runs one kind of server: a Python distribution (a `pypi` package entry) whose console
script speaks MCP on stdio. What the sandbox must grant it (egress hosts, secret names, memory,
CPU) and which console script to start come from mcpfleet's own block, `_meta["io.mcpfleet"]`,
so the same file still publishes to the official registry (which keeps only its own `_meta` key).

The JSON Schema covers the shape; the checks after it cover what a schema cannot say (PEP 440
versions, the prefix the name gives every tool, one package entry to run). Every problem is
collected before anything is raised, so a publisher fixes them all in one go.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError
from packaging.version import InvalidVersion, Version

FLEET_META_KEY = "io.mcpfleet"
MANIFEST_FILE = "server.json"

NAME_PATTERN = r"^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$"
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# PEP 508 distribution names (https://packaging.python.org/en/latest/specifications/name-normalization/).
DISTRIBUTION_PATTERN = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
NPM_NAME_PATTERN = re.compile(r"^(@[a-z0-9][a-z0-9._~-]{0,100}/)?[a-z0-9][a-z0-9._~-]{0,100}$")
# A console script is started by name, never through a shell: no paths, spaces or options.
COMMAND_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SECRET_NAME_PATTERN = r"^[A-Z][A-Z0-9_]{0,127}$"
HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EGRESS_PATTERN = rf"^{HOST_LABEL}(?:\.{HOST_LABEL})+(?::[0-9]{{1,5}})?$"

# Variables the runtime itself depends on: a secret by one of these names would replace them.
RESERVED_ENV = re.compile(r"^(PATH|HOME|USER|SHELL|PWD|TMPDIR|LANG|LC_[A-Z_]+|LD_[A-Z_]+|PYTHON[A-Z_]*|MCPFLEET_[A-Z_]*)$")

_KEY_VALUE_INPUT: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": ENV_NAME_PATTERN},
        "description": {"type": "string"},
        "isRequired": {"type": "boolean"},
        "isSecret": {"type": "boolean"},
        "default": {"type": "string"},
        "value": {"type": "string"},
        "placeholder": {"type": "string"},
        "format": {"enum": ["string", "number", "boolean", "filepath"]},
        "choices": {"type": "array", "items": {"type": "string"}},
    },
}

_PACKAGE: dict[str, Any] = {
    "type": "object",
    "required": ["registryType", "identifier", "transport"],
    "properties": {
        "registryType": {"type": "string", "minLength": 1},
        "registryBaseUrl": {"type": "string", "pattern": "^https?://"},
        "identifier": {"type": "string", "minLength": 1},
        "version": {"type": "string", "minLength": 1, "maxLength": 255, "not": {"const": "latest"}},
        "fileSha256": {"type": "string", "pattern": "^[a-f0-9]{64}$"},
        "runtimeHint": {"type": "string"},
        "transport": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": ["stdio", "streamable-http", "sse"]}},
        },
        "runtimeArguments": {"type": "array"},
        "packageArguments": {"type": "array"},
        "environmentVariables": {"type": "array", "items": _KEY_VALUE_INPUT},
    },
}

_FLEET_META: dict[str, Any] = {
    "type": "object",
    # Our own namespace: an unknown key here is a typo, not an extension.
    "additionalProperties": False,
    "properties": {
        "command": {"type": "string", "pattern": COMMAND_PATTERN},
        "egress": {"type": "array", "uniqueItems": True, "items": {"type": "string", "pattern": EGRESS_PATTERN}},
        # The server asks the fleet's models (OLLAMA_HOST, OPENAI_BASE_URL in its sandbox); charged to its user.
        "inference": {"type": "boolean"},
        "secrets": {"type": "array", "uniqueItems": True, "items": {"type": "string", "pattern": SECRET_NAME_PATTERN}},
        "memory_mb": {"type": "integer", "minimum": 16, "maximum": 65536},
        "cpus": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "server.json as mcpfleet accepts it",
    "type": "object",
    "required": ["name", "description", "version", "packages"],
    "properties": {
        "$schema": {"type": "string", "pattern": "^https?://"},
        "name": {"type": "string", "minLength": 3, "maxLength": 200, "pattern": NAME_PATTERN},
        "description": {"type": "string", "minLength": 1, "maxLength": 100},
        "title": {"type": "string", "minLength": 1, "maxLength": 100},
        "version": {"type": "string", "minLength": 1, "maxLength": 255},
        "websiteUrl": {"type": "string", "pattern": "^https?://"},
        "repository": {
            "type": "object",
            "required": ["url", "source"],
            "properties": {
                "url": {"type": "string", "pattern": "^https?://"},
                "source": {"type": "string"},
                "id": {"type": "string"},
                "subfolder": {"type": "string"},
            },
        },
        "icons": {"type": "array", "items": {"type": "object"}},
        "packages": {"type": "array", "minItems": 1, "items": _PACKAGE},
        # Remote servers are listed in the official format but mcpfleet never connects to them.
        "remotes": {"type": "array"},
        "_meta": {"type": "object", "properties": {FLEET_META_KEY: _FLEET_META}},
    },
}

_VALIDATOR = Draft202012Validator(MANIFEST_SCHEMA)

# What a pattern means, for the fields a publisher is likely to get wrong.
_PATTERN_HINTS = {
    "name": "must be in reverse-DNS form 'namespace/server' (letters, digits, '.', '-' and '_'), e.g. 'io.example/weather'",
    "command": "must be the name of a console script (letters, digits, '.', '_' and '-'; no path, spaces or options)",
    "egress": "must be a host name with an optional port, e.g. 'api.example.com' or 'api.example.com:8443'",
    "secrets": "must be an environment variable name in UPPER_SNAKE_CASE, e.g. 'WEATHER_API_KEY'",
    "environmentVariables": "must be an environment variable name (letters, digits and '_', not starting with a digit)",
    "fileSha256": "must be 64 lower-case hexadecimal digits",
}

_TYPE_NAMES = {
    "string": "a string",
    "array": "a list",
    "object": "an object",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
}


class ManifestError(ValueError):
    """The manifest cannot be accepted; `problems` holds every reason, one sentence each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"{MANIFEST_FILE} has {count} problem{'s' if count != 1 else ''}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class FleetMeta:
    """What the server asks of its sandbox, from `_meta["io.mcpfleet"]`."""

    egress: tuple[str, ...] = ()
    inference: bool = False
    secrets: tuple[str, ...] = ()
    memory_mb: int | None = None
    cpus: float | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    description: str
    prefix: str
    package: str
    command: str
    fleet: FleetMeta
    raw: dict[str, Any]
    registry_type: str = "pypi"
    """Of the package run: "pypi", or "npm" (`registry.onboard_npm`: its wheel holds the npm install)."""


def load_manifest(project_dir: Path) -> Manifest:
    path = Path(project_dir) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError([f"{MANIFEST_FILE} is missing from {project_dir}"]) from None
    except UnicodeDecodeError as exc:
        raise ManifestError([f"{MANIFEST_FILE} is not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise ManifestError([f"{MANIFEST_FILE} cannot be read: {exc.strerror}"]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ManifestError([f"{MANIFEST_FILE} is not valid JSON: {exc.msg} at {where}"]) from None
    return parse_manifest(document)


def parse_manifest(document: dict[str, Any]) -> Manifest:
    if not isinstance(document, dict):
        raise ManifestError([f"{MANIFEST_FILE} must be a JSON object"])
    errors = sorted(_VALIDATOR.iter_errors(document), key=_error_order)
    problems = [_explain(error) for error in errors]
    shape = _Shape(document, errors)

    prefix = ""
    if shape.sound("name"):
        problems += _check_name(document["name"])
        prefix = _prefix_of(document["name"])
        problems += _check_prefix(document["name"], prefix)
    version = _parse_version(document["version"], "version", problems) if shape.sound("version") else None
    given_version = document["version"] if version is not None else None
    problems += _check_fleet(shape)
    index = _runnable_package(shape, problems)
    if index is not None:
        problems += _check_package(shape, index, given_version)
    if problems:
        raise ManifestError(_unique(problems))

    assert index is not None  # else a problem was reported
    identifier: str = document["packages"][index]["identifier"]
    fleet: dict[str, Any] = document.get("_meta", {}).get(FLEET_META_KEY, {})
    return Manifest(
        name=document["name"],
        version=document["version"],
        description=document["description"],
        prefix=prefix,
        package=identifier,
        command=fleet.get("command", identifier),
        fleet=FleetMeta(
            egress=tuple(host.lower() for host in fleet.get("egress", ())),
            inference=bool(fleet.get("inference", False)),
            secrets=tuple(fleet.get("secrets", ())),
            memory_mb=fleet.get("memory_mb"),
            cpus=float(fleet["cpus"]) if "cpus" in fleet else None,
        ),
        raw=copy.deepcopy(document),
        registry_type=document["packages"][index]["registryType"],
    )


class _Shape:
    """Where the schema found the document wrong. The checks after it read only sound parts, so
    one bad field hides no problem of another, and no check trips over a value of the wrong type."""

    def __init__(self, document: dict[str, Any], errors: list[ValidationError]):
        self.document = document
        self.broken = [tuple(error.absolute_path) for error in errors]

    def get(self, *path: str | int) -> Any:
        """The value at `path`, or None when it is absent or a container on the way has the wrong type."""
        node: Any = self.document
        for key in path:
            if isinstance(key, str) and isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
                node = node[key]
            else:
                return None
        return node

    def sound(self, *path: str | int) -> bool:
        """Present, and no schema error at or below it."""
        return self.get(*path) is not None and not any(bad[: len(path)] == path for bad in self.broken)

    def items(self, *path: str | int) -> list[int]:
        """Indexes of the sound entries of the list at `path`."""
        node = self.get(*path)
        return [i for i in range(len(node)) if self.sound(*path, i)] if isinstance(node, list) else []


def _check_name(name: str) -> list[str]:
    namespace = name.split("/", 1)[0]
    if "." not in namespace:
        example = f"io.example/{name.split('/')[-1]}"
        return [f"name {name!r} must start with a reverse-DNS namespace containing a dot, e.g. {example!r}"]
    return []


def _prefix_of(name: str) -> str:
    """The name's server part as the `<prefix>__` of every tool's public name."""
    return name.rsplit("/", 1)[-1].lower().replace("-", "_").replace(".", "_")


def _check_prefix(name: str, prefix: str) -> list[str]:
    rule = "which must start with a letter and have at most 32 lower-case letters, digits and '_'"
    if not PREFIX_PATTERN.match(prefix):
        return [f"name {name!r} gives the tool prefix {prefix!r}, {rule}"]
    if "__" in prefix or prefix.endswith("_"):
        # Public names are '<prefix>__<tool>': a '__' inside or a trailing '_' makes them ambiguous.
        return [f"name {name!r} gives the tool prefix {prefix!r}, which must not contain '__' or end with '_'"]
    return []


def _parse_version(value: str, field: str, problems: list[str]) -> Version | None:
    try:
        return Version(value)
    except InvalidVersion:
        problems.append(
            f"{field} {value!r} must be a specific PEP 440 version such as '1.2.0' (no ranges, wildcards or 'latest')"
        )
        return None


def _runnable_package(shape: _Shape, problems: list[str]) -> int | None:
    """Index of the one `pypi` entry on stdio, the kind of package mcpfleet runs; or, in a manifest
    without one, of its one `npm` entry (a server onboarded with `registry add npm:`, whose wheel
    holds its install and starts it with the sandbox's Node: `registry.onboard_npm`)."""
    packages = shape.get("packages")
    if not isinstance(packages, list) or not packages:
        return None
    usable = [
        i
        for i in range(len(packages))
        if shape.sound("packages", i, "registryType") and shape.sound("packages", i, "transport", "type")
    ]
    kind = "pypi" if any(packages[i]["registryType"] == "pypi" for i in usable) else "npm"
    runnable = [i for i in usable if packages[i]["registryType"] == kind]
    if not runnable:
        if len(usable) == len(packages):  # else a broken entry may be the pypi one; its problem is reported
            kinds = ", ".join(sorted({repr(p["registryType"]) for p in packages}))
            problems.append(
                f"packages must include an entry with registryType 'pypi' (mcpfleet runs Python servers, and npm servers "
                f"added with `mcpfleet registry add npm:NAME`; found {kinds})"
            )
        return None
    stdio = [i for i in runnable if packages[i]["transport"]["type"] == "stdio"]
    if not stdio:
        problems += [f"packages[{i}].transport.type must be 'stdio'" for i in runnable]
        return None
    if len(stdio) > 1:
        places = ", ".join(f"packages[{i}]" for i in stdio)
        problems.append(f"packages must have exactly one {kind!r} entry with stdio transport, not {len(stdio)} ({places})")
        return None
    return stdio[0]


def _check_package(shape: _Shape, index: int, version: str | None) -> list[str]:
    """`version`: the top-level version, when it is a valid one."""
    where = f"packages[{index}]"
    package = shape.get("packages", index)
    problems: list[str] = []
    if package.get("registryType") == "npm":
        if shape.sound("packages", index, "identifier") and not NPM_NAME_PATTERN.match(package["identifier"]):
            problems.append(f"{where}.identifier {package['identifier']!r} must be an npm package name (name or @scope/name)")
    elif shape.sound("packages", index, "identifier") and not DISTRIBUTION_PATTERN.match(package["identifier"]):
        problems.append(
            f"{where}.identifier {package['identifier']!r} must be a Python distribution name "
            "(letters, digits, '.', '_' and '-')"
        )
    if shape.sound("packages", index, "version"):
        package_version = _parse_version(package["version"], f"{where}.version", problems)
        if version is not None and package_version is not None and package_version != Version(version):
            problems.append(f"{where}.version {package['version']!r} must equal the top-level version {version!r}")
    for field in ("runtimeArguments", "packageArguments"):
        if package.get(field):
            problems.append(f"{where}.{field} is not supported: mcpfleet starts the console script without arguments")
    secrets = _declared_secrets(shape)
    if secrets is None:  # the secrets list has problems of its own; what it holds is unclear
        return problems
    for i in shape.items("packages", index, "environmentVariables"):
        variable = package["environmentVariables"][i]
        if variable.get("isSecret") and variable.get("isRequired") and variable["name"] not in secrets:
            problems.append(
                f"{where}.environmentVariables[{i}] ({variable['name']}) is a required secret, "
                f"so _meta['{FLEET_META_KEY}'].secrets must list it"
            )
    return problems


def _declared_secrets(shape: _Shape) -> set[str] | None:
    node: Any = shape.document
    for key in ("_meta", FLEET_META_KEY, "secrets"):
        if not isinstance(node, dict):
            return None
        if key not in node:
            return set()
        node = node[key]
    return set(node) if shape.sound("_meta", FLEET_META_KEY, "secrets") else None


def _check_fleet(shape: _Shape) -> list[str]:
    where = f"_meta['{FLEET_META_KEY}']"
    problems: list[str] = []
    for i in shape.items("_meta", FLEET_META_KEY, "egress"):
        host: str = shape.get("_meta", FLEET_META_KEY, "egress", i)
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        if _is_ip_address(name):
            problems.append(f"{where}.egress[{i}] {host!r} must be a host name, not an IP address")
        elif name.rsplit(".", 1)[-1].isdigit():
            problems.append(f"{where}.egress[{i}] {host!r} must end in a top-level domain, not a number")
        if port and not 1 <= int(port) <= 65535:
            problems.append(f"{where}.egress[{i}] {host!r} has port {port}, which must be between 1 and 65535")
    for i in shape.items("_meta", FLEET_META_KEY, "secrets"):
        secret: str = shape.get("_meta", FLEET_META_KEY, "secrets", i)
        if RESERVED_ENV.match(secret):
            problems.append(f"{where}.secrets[{i}] {secret!r} is a variable the runtime itself uses; choose another name")
    return problems


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _error_order(error: ValidationError) -> tuple[str, str]:
    return (_where(error.absolute_path), error.message)


def _where(path: Iterable[Any]) -> str:
    """A JSON path as a publisher reads it: `packages[0].transport.type`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_$][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def _explain(error: ValidationError) -> str:
    """One sentence naming the field, for each kind of schema error our schema can raise."""
    where = _where(error.absolute_path)
    subject = where or MANIFEST_FILE
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "required":
        missing = re.match(r"^'(.+)' is a required property$", error.message)
        field = missing.group(1) if missing else str(expected)
        return f"{_where([*error.absolute_path, field])} is required"
    if kind == "type":
        return f"{subject} must be {_TYPE_NAMES.get(expected, expected)}"
    if kind == "enum":
        choices = " or ".join(repr(choice) for choice in expected)
        return f"{subject} must be {choices}, not {value!r}"
    if kind == "pattern":
        field = next((str(p) for p in reversed(error.absolute_path) if isinstance(p, str)), "")
        hint = _PATTERN_HINTS.get(field, f"must match {expected}")
        return f"{subject} {value!r} {hint}"
    if kind == "minLength":
        return f"{subject} must not be empty" if expected == 1 else f"{subject} must have at least {expected} characters"
    if kind == "maxLength":
        return f"{subject} must have at most {expected} characters (it has {len(value)})"
    if kind == "minItems":
        return f"{subject} must have at least {expected} entr{'y' if expected == 1 else 'ies'}"
    if kind == "uniqueItems":
        return f"{subject} must not list the same value twice"
    if kind == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = ", ".join(repr(key) for key in value if key not in known)
        return f"{subject} has unknown field(s) {extra}; known fields are {', '.join(known)}"
    if kind == "not" and expected == {"const": "latest"}:
        return f"{subject} must be a specific version, not 'latest'"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        bound = {
            "minimum": "at least",
            "exclusiveMinimum": "more than",
            "maximum": "at most",
            "exclusiveMaximum": "less than",
        }
        return f"{subject} must be {bound[kind]} {expected}, not {value!r}"
    return f"{subject}: {error.message}"


def _unique(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))
