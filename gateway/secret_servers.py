"""The servers a user's sandbox runs, each with the values of the secrets its manifest declares.

Wraps the registry (the manager's server source): a server declaring `_meta.io.mcpfleet.secrets`
gets exactly those names from Vault, with its user's values, else the tenant-wide ones. The
values travel in `ServerSpec.secrets`, which reaches the sandbox only over its channel. A value
that changes changes the spec, so the manager's next `ensure` reconfigures the sandbox and its
supervisor restarts only that server (`configure` restarts the servers whose config changed).

A declared secret that is not set, or Vault being down, marks the server `unavailable`: it still
runs (its tools stay listed), and its calls fail with a message naming the secret and the
command that sets it. While Vault is down a server keeps the values it was last given, so a
short outage restarts nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from core.accounts import principal_of
from core.vault import SecretStore, VaultUnavailable, set_command
from sandbox.servers import ServerSource, ServerSpec


class SecretServers:
    def __init__(self, source: ServerSource, store: SecretStore, pool: AsyncConnectionPool):
        self.source = source
        self.store = store
        self.pool = pool
        self._principals: dict[int, tuple[str, str] | None] = {}
        self._last: dict[tuple[int, str], dict[str, str]] = {}
        """(user id, server) -> the values last given: kept while Vault is down."""

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        specs = await self.source.servers_for(user_id)
        if user_id is None or not any(s.secret_names for s in specs):
            return specs
        principal = await self._principal(user_id)
        if principal is None:
            return specs
        return tuple([await self._with_secrets(user_id, principal, s) if s.secret_names else s for s in specs])

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        self.source.provision(tools_dir, servers)

    async def _principal(self, user_id: int) -> tuple[str, str] | None:
        if user_id not in self._principals:  # a user's tenant and name never change
            async with self.pool.connection() as conn:
                self._principals[user_id] = await principal_of(conn, user_id)
        return self._principals[user_id]

    async def _with_secrets(self, user_id: int, principal: tuple[str, str], spec: ServerSpec) -> ServerSpec:
        tenant, user = principal
        key = (user_id, spec.server)
        try:
            found, missing = await self.store.values(tenant, user, spec.server, spec.secret_names)
        except VaultUnavailable as exc:
            last = self._last.get(key)
            if last is not None:
                return dataclasses.replace(spec, secrets=last)
            return dataclasses.replace(spec, unavailable=f"{spec.server} cannot get its secrets: {exc}")
        self._last[key] = found
        if not missing:
            return dataclasses.replace(spec, secrets=found)
        commands = "; ".join(f"`{set_command(user, tenant, spec.server, name)}`" for name in missing)
        names = ", ".join(missing)
        why = (
            f"{spec.server} needs the secret {names}, which is not set for {tenant}/{user}. "
            f"Set it with {commands} (the value is read from stdin), or with PUT /api/secrets/{spec.server}/{missing[0]}"
        )
        return dataclasses.replace(spec, secrets=found, unavailable=why)
