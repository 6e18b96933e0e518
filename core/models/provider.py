"""What the router asks of a provider: one backend that answers asks for the models it serves.

| provider | module               | speaks                                   | configured by                       |
|----------|----------------------|------------------------------------------|-------------------------------------|
| `local`  | core.models.local    | llama-server's OpenAI API, on loopback   | started by the fleet (the default)  |
| `ollama` | core.models.ollama   | Ollama's API, through the `ollama` client | `OLLAMA_HOST`                       |
| `openai` | core.models.openai   | any OpenAI-compatible API, over httpx    | `MCPFLEET_MODEL_URL`, `MCPFLEET_MODEL_KEY` |

A provider knows nothing of users, quotas or audit: the router does that around it. Every method
raises `ModelError` (reason `provider` for the provider's own failures, `not_ready` while it cannot
answer yet); the router never sees a transport's exception.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from core.models.api import ChatAnswer, ChatAsk, ChatDelta, Embeddings


class Provider(Protocol):
    name: str
    """`local`, `ollama` or `openai`: what `ModelInfo.provider` says."""

    @property
    def state(self) -> str:
        """`ready`, `starting`, `building` or `failed`."""
        ...

    @property
    def detail(self) -> str:
        """Why the state is what it is, for `mcpfleet models list` (empty when ready)."""
        ...

    async def start(self) -> None:
        """Begin serving; returns at once (a provider that takes time gets ready in the background)."""

    async def close(self) -> None:
        """Stop; idempotent."""

    async def models(self) -> list[str]:
        """The names of the models it serves now ([] when it is not ready or cannot tell)."""
        ...

    async def chat(self, ask: ChatAsk, model: str) -> ChatAnswer: ...

    def chat_stream(self, ask: ChatAsk, model: str) -> AsyncGenerator[ChatDelta, None]:
        """Pieces of the answer as they come; the last carries the whole answer (see `ChatDelta`)."""
        ...

    async def embed(self, texts: list[str], model: str) -> Embeddings: ...


class HostedProvider:
    """What a provider served elsewhere (Ollama, an OpenAI-compatible API) has in common: nothing to
    start, always `ready` to be asked; `_detail` says why its last listing failed, if it did."""

    _detail = ""

    @property
    def state(self) -> str:
        return "ready"

    @property
    def detail(self) -> str:
        return self._detail

    async def start(self) -> None:
        pass
