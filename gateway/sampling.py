"""A server's `sampling/createMessage` answered by the fleet's model router instead of the client.

Who answers (`Sampling.by_fleet`): the client, when its session declared `sampling`; the fleet when
it did not (a 2025-11-25 session whose client cannot sample), and always for the tenants named in
`MCPFLEET_SAMPLING_BY_FLEET` (`*`: every tenant). A 2026-07-28 client that did not declare
`sampling` gets -32021 (MissingRequiredClientCapability) unless its tenant is named: its request
says what it can do, and the protocol holds servers to it.

The ask is charged to the user (`Asker(purpose="sampling", server=<prefix>)`), audited and counted
by the router; its quota and readiness errors reach the server as JSON-RPC errors it can read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mcp_types as types

from core.accounts import Identity
from core.models.api import Asker, ChatAnswer, ChatAsk, ModelError, Models
from sandbox.channel import RequestHandler
from sandbox.errors import SandboxRpcError

log = logging.getLogger(__name__)

METHOD = "sampling/createMessage"


class Sampling:
    def __init__(self, models: Callable[[], Models], fleet_tenants: frozenset[str]):
        self._models = models  # the fleet's router, open only while the fleet is
        self._tenants = fleet_tenants

    def by_fleet(self, identity: Identity, client_can_sample: bool, modern: bool) -> bool:
        """Whether the fleet, not the client, answers this user's servers' sampling now."""
        if "*" in self._tenants or identity.tenant in self._tenants:
            return True
        return not client_can_sample and not modern

    def or_else(self, identity: Identity, server: str, otherwise: RequestHandler) -> RequestHandler:
        """The server's sampling answered by the fleet's models; its other requests as `otherwise` does."""

        async def on_request(method: str, params: dict[str, Any] | None) -> dict[str, Any]:
            if method == METHOD:
                return await self.answer(identity, server, params)
            return await otherwise(method, params)

        return on_request

    async def answer(self, identity: Identity, server: str, params: dict[str, Any] | None) -> dict[str, Any]:
        """The router's answer as a CreateMessageResult; errors as the server's JSON-RPC errors."""
        ask = chat_ask(params or {})
        try:
            answer = await self._models().chat(Asker(identity.user_id, identity.tenant, "sampling", server), ask)
        except ModelError as exc:
            raise SandboxRpcError(types.INTERNAL_ERROR, f"the fleet's model could not answer: {exc}", {"reason": exc.reason}) from None
        return create_message_result(answer)


def chat_ask(params: dict[str, Any]) -> ChatAsk:
    """CreateMessageRequestParams in the router's chat shape (text only: the fleet's models read text)."""
    messages: list[dict[str, Any]] = []
    if isinstance(system := params.get("systemPrompt"), str) and system:
        messages.append({"role": "system", "content": system})
    for message in params.get("messages") or []:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise SandboxRpcError(types.INVALID_PARAMS, "sampling messages must have the role user or assistant")
        messages.append({"role": role, "content": _text_of(message.get("content"))})
    if not messages:
        raise SandboxRpcError(types.INVALID_PARAMS, "sampling/createMessage needs at least one message")
    max_tokens = params.get("maxTokens")
    temperature = params.get("temperature")
    stop = params.get("stopSequences") or []
    return ChatAsk(
        messages=messages,
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        temperature=float(temperature) if isinstance(temperature, int | float) else None,
        stop=[s for s in stop if isinstance(s, str)],
    )


def _text_of(content: Any) -> str:
    blocks = content if isinstance(content, list) else [content]
    texts = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise SandboxRpcError(types.INVALID_PARAMS, f"the fleet's models answer text only, not {kind!r} content")
        texts.append(block["text"])
    return "\n".join(texts)


def create_message_result(answer: ChatAnswer) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": {"type": "text", "text": answer.content},
        "model": answer.model,
        "stopReason": "maxTokens" if answer.finish_reason == "length" else "endTurn",
    }
