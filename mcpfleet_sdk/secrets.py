"""Secrets a tool server reads: the names its manifest declares, the values from its environment.

In a sandbox the fleet passes a server exactly the secrets its server.json declares, as
environment variables of the same names; the test fixture does the same with values from
`MCPFLEET_TEST_SECRET_<NAME>`. Whoever starts the server may also name the declared secrets
in `MCPFLEET_DECLARED_SECRETS` (comma-separated), so that reading an undeclared one fails
here, on the developer's machine, and not only once published.

Values never appear in a message or a log line.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver.exceptions import ToolError

from mcpfleet_sdk import project

DECLARED_ENV = "MCPFLEET_DECLARED_SECRETS"
WHERE = '_meta["io.mcpfleet"]["secrets"] in server.json'


class SecretError(ToolError, LookupError):
    """A secret that is not declared, or declared but not given to the server.

    A ToolError, so that a tool failing on it tells the caller why (the message holds names,
    never values) instead of the SDK's bare "Error executing tool".
    """


def declared_secrets() -> frozenset[str] | None:
    """The secret names the server may read, or None where nothing tells (then every name is tried)."""
    named = os.environ.get(DECLARED_ENV)
    if named is not None:
        return frozenset(n.strip() for n in named.split(",") if n.strip())
    found = project.find_project()
    if found is None:
        return None
    try:
        return frozenset(project.load(found).fleet.secrets)
    except ImportError:  # the registry is not importable here (inside a sandbox): the environment decides
        return None


def secret(name: str) -> str:
    """The value of the secret `name`, which the project's server.json must declare.

    Raises:
        SecretError: naming the variable and where to declare it, when it is not declared or not set.
    """
    declared = declared_secrets()
    if declared is not None and name not in declared:
        listed = ", ".join(sorted(declared)) or "none"
        raise SecretError(f"secret {name!r} is not declared: add it to {WHERE} (declared: {listed})")
    value = os.environ.get(name)
    if not value:
        raise SecretError(
            f"secret {name!r} is not set: the environment variable {name} is missing or empty. "
            f"It must be declared in {WHERE}; the fleet then passes it to the server, "
            f"and tests take it from MCPFLEET_TEST_SECRET_{name}"
        )
    return value
