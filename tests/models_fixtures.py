"""The real local model server for the model tests: llama-server with Gemma 3 270M, as scripts/models.sh installs it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest

from core import accounts
from core.accounts import Identity
from core.models.api import Asker
from core.models.local import MODEL_FILE, LocalProvider, find_server, models_dir


@pytest.fixture(scope="session")
async def local_model(tmp_path_factory: pytest.TempPathFactory):
    """One llama-server for the run (about 350 MB); `make test` installs it first (scripts/models.sh)."""
    if find_server() is None or not (models_dir() / MODEL_FILE).is_file():
        pytest.fail("llama-server or the Gemma model is not installed: run scripts/models.sh (make test does)")
    provider = LocalProvider(tmp_path_factory.mktemp("local-model"))
    await provider.start()
    try:
        await provider.wait_ready(300)
        yield provider
    finally:
        await provider.close()


@dataclass(frozen=True)
class People:
    tenant: str
    alice: Identity
    bob: Identity

    def asks(self, who: Identity, purpose: str = "tool", server: str | None = "notes") -> Asker:
        return Asker(user_id=who.user_id, tenant=who.tenant, purpose=purpose, server=server)  # type: ignore[arg-type]


async def people(db_pool) -> People:
    """Alice and bob in a tenant of their own, so each test's quotas and usage start from nothing."""
    tenant = f"m-{secrets.token_hex(4)}"
    async with db_pool.connection() as conn:
        alice = await accounts.add_user(conn, "alice", tenant=tenant)
        bob = await accounts.add_user(conn, "bob", tenant=tenant)
    return People(tenant, alice, bob)
