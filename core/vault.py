"""Users' and tenants' secrets for their tool servers, kept in Vault (any Vault-API server, through hvac).

Layout in the KV v2 mount, one entry per secret (so each has its own versions and dates):

    tenants/<tenant>/users/<user>/<namespace>/<server>/<NAME>   a user's own value
    tenants/<tenant>/shared/<namespace>/<server>/<NAME>         the tenant-wide value (the fallback)

with `{"value": ...}` as the entry's data. Which Vault: VAULT_ADDR with VAULT_TOKEN, or AppRole
(VAULT_ROLE_ID and VAULT_SECRET_ID), or Kubernetes auth (VAULT_K8S_ROLE, the pod's service
account token); MCPFLEET_VAULT_MOUNT names the KV mount (default `mcpfleet`, which must exist
there). Without VAULT_ADDR the fleet runs its own OpenBao (core.openbao).

hvac is blocking: every method here runs it in a thread. Values never appear in a message, a log
line or an exception raised from here; names do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import psycopg
import requests

from core import audit
from core.errors import FleetError
from core.openbao import MOUNT, TRANSIT, TRANSIT_KEY, EmbeddedOpenBao

log = logging.getLogger(__name__)

T = TypeVar("T")

SECRET_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")
SERVER_NAME = re.compile(r"^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,199}$")
MAX_VALUE_BYTES = 64 * 1024
K8S_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class SecretError(FleetError):
    """A secret request that cannot be honoured (a bad name, no such secret)."""


class VaultUnavailable(SecretError):
    """Vault could not be reached or refused the fleet's token."""


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown of a secret: never its value."""

    tenant: str
    user: str | None
    """None: tenant-wide."""
    server: str
    name: str
    version: int
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "user": self.user, "server": self.server, "name": self.name,
                "version": self.version, "updated_at": self.updated_at}


def set_command(user: str | None, tenant: str, server: str, name: str) -> str:
    """The command that sets a secret, as errors name it."""
    who = f"--tenant {tenant}" if user is None else (user if tenant == "default" else f"{tenant}/{user}")
    return f"mcpfleet secrets set {who} {server} {name}"


def _check(tenant: str, user: str | None, server: str, name: str | None = None) -> None:
    for what, value in (("tenant", tenant), ("user", user)):
        if value is not None and not _SEGMENT.match(value):
            raise SecretError(f"invalid {what} name {value!r}")
    if not SERVER_NAME.match(server) or ".." in server:
        raise SecretError(f"invalid server name {server!r}: the registry's 'namespace/server', e.g. io.example/weather")
    if name is not None and not SECRET_NAME.match(name):
        raise SecretError(f"invalid secret name {name!r}: UPPER_SNAKE_CASE, e.g. WEATHER_API_KEY")


FLEET_SECRETS = ("MCPFLEET_MODEL_KEY",)
"""The fleet's own secrets (no tool's): what a gateway reads from Vault when it starts, here rather
than in its environment. `mcpfleet secrets set --fleet NAME`."""


def _fleet_path(name: str) -> str:
    if name not in FLEET_SECRETS:
        raise SecretError(f"{name!r} is not one of the fleet's own secrets ({', '.join(FLEET_SECRETS)})")
    return f"fleet/{name}"


def _check_value(name: str, value: str) -> None:
    if not value or len(value.encode()) > MAX_VALUE_BYTES:
        raise SecretError(f"the value of {name} must be 1 to {MAX_VALUE_BYTES} bytes")
    if "\x00" in value:
        raise SecretError(f"the value of {name} holds a NUL byte, which no environment variable can")


def _base(tenant: str, user: str | None) -> str:
    return f"tenants/{tenant}/users/{user}" if user is not None else f"tenants/{tenant}/shared"


class SecretStore:
    def __init__(self, login: Callable[[], hvac.Client], mount: str = MOUNT, where: str = "Vault", transit: str = TRANSIT):
        """`login()` makes an authenticated client; called again once when Vault refuses the token
        (it expired), so a long-running gateway needs no renewal timer."""
        self._login = login
        self.mount = mount
        self.transit = transit
        self.where = where
        """Which Vault, for messages and `up`'s log (an address, never a token)."""
        self._client: hvac.Client | None = None
        self._lock = threading.Lock()

    # -- the blocking core ------------------------------------------------------------------

    def _run(self, op: Callable[[Any], T]) -> T:
        """`op(kv)` with the fleet's token; Vault's own failures turned into VaultUnavailable."""
        for attempt in (1, 2):
            try:
                with self._lock:
                    if self._client is None:
                        self._client = self._login()
                    client = self._client
                return op(client.secrets.kv.v2)
            except hvac.exceptions.Forbidden:
                with self._lock:
                    self._client = None
                if attempt == 2:
                    raise VaultUnavailable(f"{self.where} refused the fleet's token (its policy or the login is wrong)") from None
            except (requests.RequestException, hvac.exceptions.VaultDown) as exc:
                with self._lock:
                    self._client = None
                raise VaultUnavailable(f"{self.where} cannot be reached ({type(exc).__name__}); secrets are unavailable") from None
            except hvac.exceptions.VaultError as exc:
                raise VaultUnavailable(f"{self.where} failed: {type(exc).__name__}") from None
        raise AssertionError("unreachable")

    def _read(self, path: str) -> str | None:
        def op(kv: Any) -> str | None:
            try:
                entry = kv.read_secret_version(path=path, mount_point=self.mount, raise_on_deleted_version=False)
            except hvac.exceptions.InvalidPath:
                return None
            data = (entry.get("data") or {}).get("data") or {}
            value = data.get("value")
            return value if isinstance(value, str) else None

        return self._run(op)

    def _list(self, path: str) -> list[str]:
        def op(kv: Any) -> list[str]:
            try:
                return list(kv.list_secrets(path=path, mount_point=self.mount)["data"]["keys"])
            except hvac.exceptions.InvalidPath:
                return []

        return self._run(op)

    def _metadata(self, path: str) -> dict[str, Any]:
        def op(kv: Any) -> dict[str, Any]:
            return dict(kv.read_secret_metadata(path=path, mount_point=self.mount)["data"])

        return self._run(op)

    def _list_sync(self, tenant: str, user: str | None) -> list[SecretInfo]:
        base = _base(tenant, user)
        found: list[SecretInfo] = []
        for namespace in self._list(base):
            for server in self._list(f"{base}/{namespace}"):
                for name in self._list(f"{base}/{namespace}{server}"):
                    if name.endswith("/"):
                        continue
                    meta = self._metadata(f"{base}/{namespace}{server}{name}")
                    version = int(meta["current_version"])
                    current = meta["versions"].get(str(version), {})
                    if current.get("destroyed") or current.get("deletion_time"):
                        continue
                    found.append(SecretInfo(tenant, user, f"{namespace}{server}".rstrip("/"), name, version, meta["updated_time"]))
        return found

    # -- the API ----------------------------------------------------------------------------

    async def put(self, tenant: str, user: str | None, server: str, name: str, value: str) -> int:
        """Set (or rotate) a secret; returns its new version."""
        _check(tenant, user, server, name)
        _check_value(name, value)
        return await self._write(f"{_base(tenant, user)}/{server}/{name}", value)

    async def _write(self, path: str, value: str) -> int:
        def op(kv: Any) -> int:
            return int(kv.create_or_update_secret(path=path, secret={"value": value}, mount_point=self.mount)["data"]["version"])

        return await asyncio.to_thread(self._run, op)

    async def put_fleet(self, name: str, value: str) -> int:
        """Set or rotate one of the fleet's own secrets (`FLEET_SECRETS`); returns its new version."""
        path = _fleet_path(name)
        _check_value(name, value)
        return await self._write(path, value)

    async def fleet_value(self, name: str) -> str | None:
        """One of the fleet's own secrets, or None when it is not set."""
        return await asyncio.to_thread(self._read, _fleet_path(name))

    async def delete_fleet(self, name: str) -> bool:
        path = _fleet_path(name)
        if await asyncio.to_thread(self._read, path) is None:
            return False
        await asyncio.to_thread(self._run, lambda kv: kv.delete_metadata_and_all_versions(path=path, mount_point=self.mount))
        return True

    async def delete(self, tenant: str, user: str | None, server: str, name: str) -> bool:
        """Remove a secret and all its versions; False if there was none."""
        _check(tenant, user, server, name)
        path = f"{_base(tenant, user)}/{server}/{name}"
        if await asyncio.to_thread(self._read, path) is None:
            return False
        await asyncio.to_thread(
            self._run, lambda kv: kv.delete_metadata_and_all_versions(path=path, mount_point=self.mount)
        )
        return True

    async def list_secrets(self, tenant: str, user: str | None) -> list[SecretInfo]:
        """A user's own secrets (`user` None: the tenant-wide ones), without values."""
        _check(tenant, user, "x/x")
        return await asyncio.to_thread(self._list_sync, tenant, user)

    def data_key(self) -> tuple[bytes, str]:
        """A new AES-256 key from the transit engine: (the key, its wrapped form to keep). Blocking."""
        def op(kv: Any) -> tuple[bytes, str]:
            data = self._client_now().secrets.transit.generate_data_key(
                TRANSIT_KEY, key_type="plaintext", mount_point=self.transit)["data"]
            return base64.b64decode(data["plaintext"]), str(data["ciphertext"])

        return self._run(op)

    def unwrap(self, wrapped: str) -> bytes:
        """The key `data_key` returned wrapped. Blocking."""
        def op(kv: Any) -> bytes:
            data = self._client_now().secrets.transit.decrypt_data(TRANSIT_KEY, wrapped, mount_point=self.transit)["data"]
            return base64.b64decode(data["plaintext"])

        return self._run(op)

    def _client_now(self) -> hvac.Client:
        assert self._client is not None  # set by _run before it calls its op
        return self._client

    async def values(self, tenant: str, user: str, server: str, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        """The values of `names` for the user's `server`: the user's own, else the tenant's.
        Returns (found, missing names)."""
        _check(tenant, user, server)

        def read_all() -> tuple[dict[str, str], list[str]]:
            found: dict[str, str] = {}
            for name in names:
                value = self._read(f"{_base(tenant, user)}/{server}/{name}")
                if value is None:
                    value = self._read(f"{_base(tenant, None)}/{server}/{name}")
                if value is not None:
                    found[name] = value
            return found, [n for n in names if n not in found]

        return await asyncio.to_thread(read_all)


# -- which Vault ------------------------------------------------------------------------------


def _external_login(addr: str) -> Callable[[], hvac.Client]:
    def login() -> hvac.Client:
        client = hvac.Client(addr, namespace=os.environ.get("VAULT_NAMESPACE") or None)
        if os.environ.get("VAULT_ROLE_ID"):
            client.auth.approle.login(role_id=os.environ["VAULT_ROLE_ID"], secret_id=os.environ.get("VAULT_SECRET_ID"))
        elif os.environ.get("VAULT_K8S_ROLE"):
            jwt = Path(os.environ.get("VAULT_K8S_TOKEN_FILE") or K8S_TOKEN).read_text().strip()
            hvac.api.auth_methods.Kubernetes(client.adapter).login(role=os.environ["VAULT_K8S_ROLE"], jwt=jwt)
        elif os.environ.get("VAULT_TOKEN"):
            client.token = os.environ["VAULT_TOKEN"]
        else:
            raise VaultUnavailable("VAULT_ADDR is set but no login: set VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID, or VAULT_K8S_ROLE")
        return client

    return login


@contextlib.contextmanager
def open_secrets(home: Path) -> Iterator[SecretStore]:
    """The fleet's secret store: the Vault at VAULT_ADDR, else the embedded OpenBao (started if
    none runs for `home`, and stopped again on leaving if this call started it). Blocking."""
    addr = os.environ.get("VAULT_ADDR")
    if addr:
        mount = os.environ.get("MCPFLEET_VAULT_MOUNT") or MOUNT
        transit = os.environ.get("MCPFLEET_VAULT_TRANSIT") or TRANSIT
        log.info("secrets: Vault at %s, mount %s, transit %s", addr, mount, transit)
        yield SecretStore(_external_login(addr), mount, where=f"Vault at {addr}", transit=transit)
        return
    bao = EmbeddedOpenBao(home)
    bao.start()
    try:
        memory = bao.memory_bytes()
        log.info("secrets: embedded OpenBao at %s (storage %s)%s", bao.addr, bao.storage,
                 f", {memory / 2**20:.0f} MB" if memory else "")
        yield SecretStore(lambda: hvac.Client(bao.addr, token=bao.token()), MOUNT, where=f"the embedded OpenBao at {bao.addr}")
    finally:
        bao.stop()


# -- changes, audited ---------------------------------------------------------------------------


def _target(tenant: str, user: str | None) -> str:
    return f"{tenant}/{user}" if user is not None else f"{tenant} (tenant-wide)"


async def set_secret(
    store: SecretStore, conn: psycopg.AsyncConnection, *, actor: str | None, tenant: str, user: str | None,
    server: str, name: str, value: str,
) -> int:
    """Set or rotate a secret and audit it (its name and version; never its value). Returns the version."""
    version = await store.put(tenant, user, server, name, value)
    await audit.append(conn, action="secret.set", outcome="ok", tenant=tenant, actor=actor, target=_target(tenant, user),
                       detail={"server": server, "name": name, "version": version})
    return version


async def remove_secret(
    store: SecretStore, conn: psycopg.AsyncConnection, *, actor: str | None, tenant: str, user: str | None, server: str, name: str,
) -> bool:
    """Remove a secret (all its versions) and audit it; False, and nothing audited, if there was none."""
    removed = await store.delete(tenant, user, server, name)
    if removed:
        await audit.append(conn, action="secret.remove", outcome="ok", tenant=tenant, actor=actor, target=_target(tenant, user),
                           detail={"server": server, "name": name})
    return removed
