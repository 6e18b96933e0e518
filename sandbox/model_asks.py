"""The gateway's end of a sandbox's model endpoint (the supervisor's is `sandbox.supervisor.models`).

A `model_ask` from the supervisor names a server and carries one HTTP request of the Ollama or
OpenAI API. What it means, whether that server may ask and what the router answers is the
`ModelGate`'s to decide (the gateway's `gateway.model_relay`); this module only runs each ask as a
task of the channel, sends its answer back in `model_reply` pieces as they come, and stops it
when the server hangs up (`model_cancel`) or the channel breaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox import wire
from sandbox.channel import Connection
from sandbox.tunnels import Sandbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAnswer:
    """An HTTP answer: `body` whole, or `pieces` streamed (each written as it comes)."""

    status: int
    content_type: str = "application/json"
    body: str = ""
    pieces: AsyncIterator[str] | None = None


class ModelGate(Protocol):
    async def answer(self, sandbox: Sandbox, server: str, method: str, path: str, body: str) -> ModelAnswer:
        """The answer to `server`'s request, refusals included (in its API's error shape)."""
        ...


class ModelRelay:
    """The model asks of one sandbox's channel."""

    def __init__(self, gate: ModelGate | None):
        """`gate` None: every ask is refused (a gateway without models)."""
        self.gate = gate
        self.sandbox: Sandbox | None = None
        """Set once the manager holds the sandbox, as `TunnelRelay.sandbox`; before, every ask is refused."""
        self._asks: dict[int, asyncio.Task[None]] = {}

    def on_message(self, connection: Connection, message: dict[str, Any]) -> None:
        ask = message.get("ask")
        if not isinstance(ask, int):
            return
        if message.get("type") == "model_cancel":
            task = self._asks.pop(ask, None)
            if task is not None:
                task.cancel()
            return
        if ask in self._asks or len(self._asks) >= wire.MAX_MODEL_ASKS:
            connection.send(_refusal(ask, 429, f"at most {wire.MAX_MODEL_ASKS} model requests at once per sandbox"))
            return
        task = asyncio.create_task(self._answer(connection, ask, message))
        self._asks[ask] = task
        task.add_done_callback(lambda _: self._asks.pop(ask, None))

    async def _answer(self, connection: Connection, ask: int, message: dict[str, Any]) -> None:
        send = connection.send
        sandbox, gate = self.sandbox, self.gate
        if gate is None:
            send(_refusal(ask, 403, "this gateway offers no models"))
            return
        if sandbox is None:
            send(_refusal(ask, 503, "this sandbox is not ready to ask models yet"))
            return
        started = False
        try:
            answer = await gate.answer(sandbox, str(message.get("server", "")), str(message.get("method", "")),
                                            str(message.get("path", "")), str(message.get("body", "")))
            if answer.pieces is None:
                send({"type": "model_reply", "ask": ask, "status": answer.status, "content_type": answer.content_type,
                      "data": answer.body, "done": True})
                return
            send({"type": "model_reply", "ask": ask, "status": answer.status, "content_type": answer.content_type,
                  "data": "", "done": False})
            started = True
            async for piece in answer.pieces:
                send({"type": "model_reply", "ask": ask, "data": piece, "done": False})
            send({"type": "model_reply", "ask": ask, "data": "", "done": True})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave the tool waiting forever
            log.exception("model ask %d of %s failed", ask, message.get("server"))
            if started:
                send({"type": "model_reply", "ask": ask, "data": "", "done": True})
            else:
                send(_refusal(ask, 500, f"the gateway failed to answer: {type(exc).__name__}"))

    def drop_all(self) -> None:
        """The channel broke: nobody is left to answer."""
        for task in list(self._asks.values()):
            task.cancel()
        self._asks.clear()


def _refusal(ask: int, status: int, message: str) -> wire.ModelReply:
    """Refused before the gateway knew which API was asked: a body both APIs' clients read as an error."""
    return {"type": "model_reply", "ask": ask, "status": status, "content_type": "application/json",
            "data": json.dumps({"error": {"message": f"mcpfleet: {message}", "code": status}}), "done": True}
