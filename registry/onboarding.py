"""Adding an existing MCP server from an index by name (`pypi:NAME[==VERSION]`, `npm:NAME[@VERSION]`):
the package fetched (registry/onboard.py, registry/onboard_npm.py) and published as an upload is.
The registry API (`POST /registry/v1/add`, hence `mcpfleet registry add`) and the admin console
both call `add`, so a source is refused with the same words wherever it is given.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from core.accounts import Identity
from registry.onboard import OnboardError, fetch_pypi
from registry.onboard_npm import fetch_npm
from registry.store import RegistryError

if TYPE_CHECKING:
    from registry.service import Registry


async def add(registry: Registry, who: Identity, source: str, *, name: str | None = None,
              command: str | None = None) -> dict[str, Any]:
    """The publish result of the package (its version is validated as any publish), with its
    `manifest` and where that came from (`server_json`: the package's own file, or generated). A source that cannot be onboarded is a RegistryError 400 saying why."""
    try:
        if source.startswith("npm:"):
            onboarded = await asyncio.to_thread(fetch_npm, source, name=name, command=command)
        else:
            onboarded = await asyncio.to_thread(fetch_pypi, source, registry.python, name=name, command=command)
    except OnboardError as exc:
        raise RegistryError(400, str(exc)) from None
    result = await registry.publish(who, onboarded.manifest, onboarded.wheel, manifest_source=onboarded.manifest_source)
    result["manifest"], result["server_json"] = onboarded.manifest, onboarded.manifest_source
    return result
