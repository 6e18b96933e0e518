"""The model router: picks the provider for an ask, refuses it over quota, counts and audits it.

A model is named as its provider lists it (`gemma-3-270m`, `llama3.2:1b`, `gpt-4o-mini`) or with the
provider's name in front (`ollama/llama3.2:1b`) where two providers list the same name. No name:
`default_model` (MCPFLEET_MODEL), else the first ready provider's first model, in the order the
providers were given. The providers' lists are kept for a minute (a hosted API's list is a round trip).

Each ask is one audit entry `model.ask` (user, server, purpose, provider, model, tokens, latency;
never the messages or the answer) and, when answered, one more ask on the user's usage row of the
day. Refusals (over quota, not ready, unknown model) and failures are audited too, with their reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from psycopg_pool import AsyncConnectionPool

from core import accounts, audit
from core.models import usage
from core.models.api import Asker, ChatAnswer, ChatAsk, ChatDelta, Embeddings, ModelError, ModelInfo
from core.models.provider import Provider

log = logging.getLogger(__name__)

MODELS_TTL_S = 60.0


class Router:
    def __init__(self, providers: list[Provider], pool: AsyncConnectionPool, *, default_model: str | None = None,
                 quotas: usage.Quotas = usage.Quotas()):
        self.providers = providers
        self.pool = pool
        self.default_model = default_model
        self.quotas = quotas
        self._listed: dict[str, tuple[float, list[str]]] = {}

    async def start(self) -> None:
        for provider in self.providers:
            await provider.start()

    async def close(self) -> None:
        for provider in reversed(self.providers):
            await provider.close()

    def provider(self, name: str) -> Provider | None:
        return next((p for p in self.providers if p.name == name), None)

    async def _models_of(self, provider: Provider) -> list[str]:
        at, names = self._listed.get(provider.name, (0.0, []))
        if time.monotonic() - at > MODELS_TTL_S or not names:
            names = await provider.models()
            self._listed[provider.name] = (time.monotonic(), names)
        return names

    async def route(self, model: str | None) -> tuple[Provider, str]:
        """The provider for `model` and the name it knows it by; ModelError `unknown_model` or `not_ready`."""
        name = model or self.default_model
        if name is None:
            for provider in self.providers:
                if provider.state == "ready" and (names := await self._models_of(provider)):
                    return provider, names[0]
            waiting = [f"{p.name} is {p.state} ({p.detail})" for p in self.providers if p.state != "ready"]
            if waiting:
                raise ModelError("not_ready", "no model is ready yet: " + "; ".join(waiting))
            raise ModelError("unknown_model", "no provider lists a model, and MCPFLEET_MODEL names none")
        chosen: tuple[Provider, str] | None = None
        for provider in self.providers:
            if name.startswith(provider.name + "/"):
                chosen = provider, name[len(provider.name) + 1:]
                break
        if chosen is None:
            for provider in self.providers:
                if name in await self._models_of(provider):
                    chosen = provider, name
                    break
        if chosen is None and len(self.providers) == 1 and self.providers[0].name != "local" \
                and not self._listed.get(self.providers[0].name, (0, []))[1]:
            chosen = self.providers[0], name  # a hosted API that does not list its models: it says itself whether it has it
        if chosen is None:
            known = [f"{p.name}: {', '.join(self._listed.get(p.name, (0, []))[1]) or '-'}" for p in self.providers]
            raise ModelError("unknown_model", f"no provider serves the model {name!r} (known: {'; '.join(known) or 'none'})")
        if chosen[0].state != "ready":
            raise ModelError("not_ready", f"the model {name!r} is not ready yet: {chosen[0].name} is {chosen[0].state} ({chosen[0].detail})")
        return chosen

    async def list_models(self) -> list[ModelInfo]:
        infos: list[ModelInfo] = []
        default_taken = False
        for provider in self.providers:
            names = await self._models_of(provider) if provider.state == "ready" or provider.name == "local" else []
            for name in names or [""]:
                is_default = bool(name) and not default_taken and (
                    name == self.default_model or self.default_model == f"{provider.name}/{name}"
                    or (self.default_model is None and provider.state == "ready"))
                default_taken = default_taken or is_default
                infos.append(ModelInfo(name=name, provider=provider.name, state=provider.state,
                                       detail=provider.detail, default=is_default))
        return infos

    async def chat(self, asker: Asker, ask: ChatAsk) -> ChatAnswer:
        started = time.monotonic()
        provider, model = await self._admit(asker, ask.model, started)
        try:
            answer = await provider.chat(ask, model)
        except ModelError as exc:
            await self._audit(asker, provider.name, model, started, error=exc)
            raise
        await self._count(asker, provider.name, answer.model, answer.tokens_in, answer.tokens_out, started)
        return answer

    async def chat_stream(self, asker: Asker, ask: ChatAsk) -> AsyncIterator[ChatDelta]:
        started = time.monotonic()
        provider, model = await self._admit(asker, ask.model, started)
        first: float | None = None
        try:
            async for delta in provider.chat_stream(ask, model):
                if delta.answer is not None:
                    a = delta.answer
                    await self._count(asker, provider.name, a.model, a.tokens_in, a.tokens_out, started,
                                      first_token_ms=None if first is None else int((first - started) * 1000))
                elif first is None:
                    first = time.monotonic()
                yield delta
        except ModelError as exc:
            await self._audit(asker, provider.name, model, started, error=exc)
            raise

    async def embed(self, asker: Asker, texts: list[str], model: str | None = None) -> Embeddings:
        started = time.monotonic()
        provider, name = await self._admit(asker, model, started)
        try:
            embeddings = await provider.embed(texts, name)
        except ModelError as exc:
            await self._audit(asker, provider.name, name, started, error=exc)
            raise
        await self._count(asker, provider.name, embeddings.model, embeddings.tokens_in, 0, started)
        return embeddings

    async def _admit(self, asker: Asker, model: str | None, started: float) -> tuple[Provider, str]:
        """The route, after the quota check; a refusal is audited before it is raised."""
        try:
            provider, name = await self.route(model)
            async with self.pool.connection() as conn:
                await usage.check_quota(conn, asker, self.quotas)
        except ModelError as exc:
            await self._audit(asker, None, model or self.default_model or "", started, error=exc)
            raise
        return provider, name

    async def _count(self, asker: Asker, provider: str, model: str, tokens_in: int, tokens_out: int, started: float,
                     **extra: Any) -> None:
        latency_ms = int((time.monotonic() - started) * 1000)
        async with self.pool.connection() as conn, conn.transaction():
            await usage.record(conn, asker, model, tokens_in, tokens_out, latency_ms)
            await audit.append(conn, **await _entry(conn, asker, provider, model, "ok", {
                "tokens_in": tokens_in, "tokens_out": tokens_out, "latency_ms": latency_ms, **extra}))

    async def _audit(self, asker: Asker, provider: str | None, model: str, started: float, *, error: ModelError) -> None:
        outcome = "refused" if error.reason in ("over_quota", "not_ready", "unknown_model", "invalid") else "error"
        detail = {"reason": error.reason, "latency_ms": int((time.monotonic() - started) * 1000)}
        async with self.pool.connection() as conn:
            await audit.append(conn, **await _entry(conn, asker, provider, model, outcome, detail))


async def _entry(conn: Any, asker: Asker, provider: str | None, model: str, outcome: str,
                 detail: dict[str, Any]) -> dict[str, Any]:
    """The audit entry's fields; its actor is the user's principal (`tenant/user`), as for tool calls."""
    names = await accounts.principal_of(conn, asker.user_id)
    return {
        "action": "model.ask", "outcome": outcome, "tenant": asker.tenant,
        "actor": f"{names[0]}/{names[1]}" if names else f"user#{asker.user_id}",
        "target": model or None,
        "detail": {"user_id": asker.user_id, "server": asker.server, "purpose": asker.purpose, "provider": provider, **detail},
    }
