"""The operator's settings, read once from the environment at start.

| Variable                     | Default                | Meaning                                                   |
|------------------------------|------------------------|-----------------------------------------------------------|
| MCPFLEET_NAMESPACES          | mcpfleet               | comma-separated namespaces watched (never cluster-wide)   |
| MCPFLEET_SANDBOX_IMAGE       | mcpfleet-sandbox:dev   | the sandbox pods' image                                   |
| MCPFLEET_SANDBOX_KEY_FILE    | (required to create)   | the fleet key; per-sandbox tokens are HMACs under it      |
| MCPFLEET_IDLE_HIBERNATE_S    | 600                    | hibernate a sandbox whose last activity is older (0: off) |
| MCPFLEET_IDLE_CHECK_S        | 30                     | how often each sandbox's idle timer looks                 |
| MCPFLEET_POOL_CHECK_S        | 10                     | how often each pool's timer refills                       |
| MCPFLEET_TOOLS_IMAGE         | mcpfleet-gateway:dev   | the init container that fetches published servers' wheels |
| MCPFLEET_GATEWAY_URL         | http://mcpfleet-gateway:8080 | where that init container fetches them (`registry.fetch`) |
| MCPFLEET_START_DEADLINE_S    | 300                    | a pod not Ready this long after its creation fails (0: off) |
| MCPFLEET_OPERATOR_PEERING    | mcpfleet               | kopf's peering name (a KopfPeering object); "" standalone |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ("mcpfleet",)
    image: str = "mcpfleet-sandbox:dev"
    key_file: str | None = None
    idle_hibernate_s: float = 600.0
    idle_check_s: float = 30.0
    pool_check_s: float = 10.0
    start_deadline_s: float = 300.0
    tools_image: str = "mcpfleet-gateway:dev"
    gateway_url: str = "http://mcpfleet-gateway:8080"
    peering: str = "mcpfleet"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        namespaces = tuple(n.strip() for n in env.get("MCPFLEET_NAMESPACES", "mcpfleet").split(",") if n.strip())
        return cls(
            namespaces=namespaces or ("mcpfleet",),
            image=env.get("MCPFLEET_SANDBOX_IMAGE", cls.image),
            key_file=env.get("MCPFLEET_SANDBOX_KEY_FILE") or None,
            idle_hibernate_s=float(env.get("MCPFLEET_IDLE_HIBERNATE_S", cls.idle_hibernate_s)),
            idle_check_s=float(env.get("MCPFLEET_IDLE_CHECK_S", cls.idle_check_s)),
            pool_check_s=float(env.get("MCPFLEET_POOL_CHECK_S", cls.pool_check_s)),
            start_deadline_s=float(env.get("MCPFLEET_START_DEADLINE_S", cls.start_deadline_s)),
            tools_image=env.get("MCPFLEET_TOOLS_IMAGE", cls.tools_image),
            gateway_url=env.get("MCPFLEET_GATEWAY_URL", cls.gateway_url),
            peering=env.get("MCPFLEET_OPERATOR_PEERING", cls.peering),
        )

    def fleet_key(self) -> bytes:
        """The fleet key's bytes; raises (a permanent error for the handler) when it is not configured."""
        if not self.key_file:
            raise RuntimeError("MCPFLEET_SANDBOX_KEY_FILE is not set: the operator cannot derive sandbox tokens")
        with open(self.key_file, "rb") as f:
            return f.read().strip()
