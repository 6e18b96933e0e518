"""The router as the environment configures it (`Fleet` opens it as `fleet.models`).

| variable                               | what                                                              |
|----------------------------------------|-------------------------------------------------------------------|
| `MCPFLEET_MODEL_URL`                   | an OpenAI-compatible API (`https://host/v1`): provider `openai`    |
| `MCPFLEET_MODEL_KEY`                   | its key (sent as a bearer token; never logged or audited); held in Vault with `mcpfleet secrets set --fleet MCPFLEET_MODEL_KEY`, which wins over the variable |
| `OLLAMA_HOST`                          | an Ollama server: provider `ollama`                               |
| `MCPFLEET_LOCAL_MODEL`                 | `auto` (default: the local model when neither of the above is set), `on`, `off` |
| `MCPFLEET_MODEL`                       | the default model's name                                          |
| `MCPFLEET_MODEL_TOKENS_PER_DAY`        | tokens a user may use a day, where their tier sets none           |
| `MCPFLEET_MODEL_TENANT_TOKENS_PER_DAY` | tokens a tenant may use a day, where the tenant sets none         |
| `MCPFLEET_MODELS_DIR`, `MCPFLEET_LLAMA_SERVER` | where the local model file is, and llama-server when not from the wheel |
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from core.errors import FleetError
from core.models.local import LocalProvider
from core.models.openai import OpenAIProvider
from core.models.provider import Provider
from core.models.router import Router
from core.models.usage import Quotas


def _quota(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise FleetError(f"{name}={raw!r}: expected a whole number of tokens") from None
    if value < 0:
        raise FleetError(f"{name}={raw!r}: must not be negative")
    return value


def providers_from_env(log_dir: Path, environ: Mapping[str, str] = os.environ,
                       on_ready: Callable[[], None] | None = None, model_key: str | None = None) -> list[Provider]:
    """`model_key`: the OpenAI-compatible API's key from Vault (the fleet's own secret), else the variable's."""
    providers: list[Provider] = []
    if url := environ.get("MCPFLEET_MODEL_URL", "").strip():
        providers.append(OpenAIProvider(url, model_key or environ.get("MCPFLEET_MODEL_KEY") or None))
    if host := environ.get("OLLAMA_HOST", "").strip():
        from core.models.ollama import OllamaProvider  # the `ollama` extra, only when asked for

        providers.append(OllamaProvider(host))
    local = (environ.get("MCPFLEET_LOCAL_MODEL") or "auto").strip().lower()
    if local not in ("auto", "on", "off"):
        raise FleetError(f"MCPFLEET_LOCAL_MODEL={local!r}: expected auto, on or off")
    if local == "on" or (local == "auto" and not providers):
        providers.append(LocalProvider(log_dir, on_ready=on_ready))
    return providers


def router_from_env(pool: AsyncConnectionPool, log_dir: Path, environ: Mapping[str, str] = os.environ,
                    model_key: str | None = None) -> Router:
    """Not started: `await router.start()` (returns at once; the local model gets ready in the background)."""
    return Router(
        providers_from_env(log_dir, environ, model_key=model_key), pool,
        default_model=environ.get("MCPFLEET_MODEL", "").strip() or None,
        quotas=Quotas(_quota(environ, "MCPFLEET_MODEL_TOKENS_PER_DAY"), _quota(environ, "MCPFLEET_MODEL_TENANT_TOKENS_PER_DAY")),
    )
