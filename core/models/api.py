"""What the model router offers to the rest of the fleet, whichever provider answers.

Every ask names who asks (`Asker`): the router counts its tokens against that user and tenant, audits
it and refuses it over quota. Messages are in the OpenAI chat shape (`{"role": ..., "content": "..."}`,
roles system, user, assistant), the one shape every provider here speaks or is translated from; the
in-sandbox Ollama endpoint, sampling and tool review translate into it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from core.errors import FleetError

Purpose = Literal["tool", "sampling", "review", "search"]


class ModelError(FleetError):
    """An ask the router cannot answer. `reason` is stable for programs: `not_ready` (the local model
    server is still being built or started), `unknown_model`, `over_quota`, `provider` (the provider
    failed or timed out), `invalid` (a malformed ask)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Asker:
    """Who is charged for an ask. `server` is the asking server's prefix when a tool asks."""

    user_id: int
    tenant: str
    purpose: Purpose
    server: str | None = None


@dataclass(frozen=True)
class ChatAsk:
    messages: list[dict[str, Any]]
    model: str | None = None
    """None: the default model (MCPFLEET_MODEL, else the first ready provider's)."""
    max_tokens: int | None = None
    temperature: float | None = None
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    """Constrain the answer to this JSON schema, where the provider can."""


@dataclass(frozen=True)
class ChatAnswer:
    model: str
    content: str
    finish_reason: str
    """`stop` or `length`, as OpenAI says it."""
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class ChatDelta:
    """One piece of a streamed answer; the last one carries the whole `answer` (and empty `content`)."""

    content: str
    answer: ChatAnswer | None = None


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    tokens_in: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    provider: str
    """`local`, `ollama` or `openai`."""
    state: str
    """`ready`, `starting`, `building` or `failed` (then `detail` says why)."""
    detail: str = ""
    default: bool = False


class Models(Protocol):
    """The router. Raises `ModelError` for what it cannot answer."""

    async def chat(self, asker: Asker, ask: ChatAsk) -> ChatAnswer: ...

    def chat_stream(self, asker: Asker, ask: ChatAsk) -> AsyncIterator[ChatDelta]: ...

    async def embed(self, asker: Asker, texts: list[str], model: str | None = None) -> Embeddings: ...

    async def list_models(self) -> list[ModelInfo]: ...
