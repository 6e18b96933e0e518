"""Asking the client for input (elicitation, sampling, roots) in either protocol era.

On 2026-07-28 a server never sends a request of its own: it answers with an
`InputRequiredResult` naming what it needs, and the client retries the original
request carrying the answers. Answers from earlier rounds travel in `requestState`,
which the SDK seals on the way out and verifies on the way back, so each question is
asked once and a client cannot forge earlier answers. On 2025-11-25 each question is
sent to the client as a request while the call waits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    INVALID_PARAMS,
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    CreateMessageRequest,
    CreateMessageResult,
    ElicitRequest,
    ElicitResult,
    InputRequest,
    InputRequiredResult,
    ListRootsRequest,
    ListRootsResult,
)
from pydantic import BaseModel, TypeAdapter, ValidationError

from mcp_servers.conformance.era import is_stateless

# How a server behind an mcpfleet supervisor ties its request to the call it asks for, and names the
# question for a 2026-07-28 client (sandbox/wire.py, which servers may not import, defines them).
RELATED_REQUEST_META = "io.mcpfleet/relatedRequestId"
INPUT_KEY_META = "io.mcpfleet/inputKey"

# Which client capability each kind of question needs, and what a valid answer is.
_CAPABILITY = {"elicitation/create": "elicitation", "sampling/createMessage": "sampling", "roots/list": "roots"}
_ANSWER: dict[str, type[BaseModel]] = {
    "elicitation/create": ElicitResult,
    "sampling/createMessage": CreateMessageResult,
    "roots/list": ListRootsResult,
}


def elicitation(message: str, schema: dict[str, Any]) -> ElicitRequest:
    return ElicitRequest.model_validate(
        {"method": "elicitation/create", "params": {"mode": "form", "message": message, "requestedSchema": schema}}
    )


def sampling(prompt: str, max_tokens: int) -> CreateMessageRequest:
    return CreateMessageRequest.model_validate(
        {
            "method": "sampling/createMessage",
            "params": {
                "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}],
                "maxTokens": max_tokens,
            },
        }
    )


def roots() -> ListRootsRequest:
    return ListRootsRequest()


class ClientInput:
    """The answers one request has gathered, and the means to ask for more."""

    def __init__(self, ctx: Context[Any, Any]):
        self._ctx = ctx
        self.stateless = is_stateless(ctx)
        state = _load_state(ctx.request_state) if self.stateless else {}
        self.state_echoed = bool(state)
        self.note: Any = state.get("note")
        """What the previous round left for this one (see `ask(note=...)`)."""
        self._recorded: dict[str, dict[str, Any]] = dict(state.get("answers", {}))
        self._fresh: Mapping[str, Any] = (ctx.input_responses or {}) if self.stateless else {}
        self._known: dict[str, BaseModel] = {}  # answers already at hand in this request

    def supports(self, question: InputRequest) -> bool:
        """Whether the client declared the capability this question needs.

        A gateway in front (mcpfleet) names the capabilities of the client behind each request in
        the request's `_meta`; they count over what the gateway declared once for the session.
        """
        forwarded = self._forwarded_capabilities()
        if forwarded is not None:
            return _CAPABILITY[question.method] in forwarded
        capabilities = self._ctx.client_capabilities
        return capabilities is not None and getattr(capabilities, _CAPABILITY[question.method]) is not None

    def _forwarded_capabilities(self) -> Mapping[str, Any] | None:
        if self.stateless:
            return None
        params = self._ctx.request_context.params or {}
        meta = params.get("_meta") if isinstance(params, Mapping) else None
        declared = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, Mapping) else None
        return declared if isinstance(declared, Mapping) else None

    async def ask(
        self, questions: Mapping[str, InputRequest], *, note: Any = None, needs_state: bool = False
    ) -> dict[str, BaseModel] | InputRequiredResult:
        """The answer to every question, keyed as asked, or the result that asks for the missing ones.

        `note` is kept in the request state for the next round. With `needs_state`, answers
        that arrive without the state this server issued are not taken: the questions are
        asked again, with state.
        """
        for question in questions.values():
            if not self.supports(question):
                self._refuse(question)
        if not self.stateless:
            # Asked together, as a 2026-07-28 server would: a gateway can put them in one round.
            missing = [key for key in questions if key not in self._known]
            answers = await asyncio.gather(*(self._send(key, questions[key]) for key in missing))
            self._known.update(zip(missing, answers))
            return {key: self._known[key] for key in questions}

        for key, question in questions.items():
            if key in self._known:
                continue
            if key in self._recorded:
                self._known[key] = _answer_type(question).model_validate(self._recorded[key])
            elif key in self._fresh and (self.state_echoed or not needs_state):
                self._known[key] = _checked(key, question, self._fresh[key])
        missing = {key: question for key, question in questions.items() if key not in self._known}
        if not missing:
            return {key: self._known[key] for key in questions}
        answered = {
            key: answer.model_dump(mode="json", by_alias=True, exclude_none=True) for key, answer in self._known.items()
        }
        state = json.dumps({"answers": {**self._recorded, **answered}, "note": note})
        return InputRequiredResult(input_requests=missing, request_state=state)

    async def _send(self, key: str, question: InputRequest) -> BaseModel:
        # The key rides the request so that a gateway turning it into input_required keeps its name.
        wire = question.model_dump(mode="json", by_alias=True, exclude_none=True)
        params = wire.setdefault("params", {})
        # So does the call it belongs to: over stdio nothing else ties the two (see sandbox/wire.py).
        params["_meta"] = {**params.get("_meta", {}), INPUT_KEY_META: key, RELATED_REQUEST_META: self._ctx.request_context.request_id}
        named = type(question).model_validate(wire)
        answer = await self._ctx.session.send_request(
            named, _answer_type(question), metadata=ServerMessageMetadata(related_request_id=self._ctx.request_id)
        )
        if isinstance(answer, ElicitResult) and isinstance(question, ElicitRequest):
            problem = _schema_problem(question, answer)
            if problem:
                raise ToolError(f"the answer to {key!r} does not match the requested schema: {problem}")
        return answer

    def _refuse(self, question: InputRequest) -> None:
        capability = _CAPABILITY[question.method]
        if self.stateless or self._forwarded_capabilities() is not None:
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message=f"this request needs the client capability {capability!r}, which the client did not declare",
                data={"requiredCapabilities": {capability: {}}},
            )
        raise ToolError(f"the client did not declare the {capability!r} capability, which this tool needs")


def _answer_type(question: InputRequest) -> type[BaseModel]:
    return _ANSWER[question.method]


def _checked(key: str, question: InputRequest, answer: Any) -> BaseModel:
    """A client's answer, if it is one to this question; a -32602 error otherwise."""
    expected = _answer_type(question)
    try:
        wire = (
            answer.model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(answer, BaseModel)
            else answer
        )
        typed = TypeAdapter(expected).validate_python(wire)
    except ValidationError:
        raise MCPError(
            code=INVALID_PARAMS, message=f"inputResponses[{key!r}] is not an answer to {question.method}"
        ) from None
    if isinstance(typed, ElicitResult) and isinstance(question, ElicitRequest):
        problem = _schema_problem(question, typed)
        if problem:
            raise MCPError(
                code=INVALID_PARAMS, message=f"inputResponses[{key!r}] does not match the requested schema: {problem}"
            )
    return typed


def _schema_problem(question: ElicitRequest, answer: ElicitResult) -> str | None:
    if answer.action != "accept":
        return None
    if answer.content is None:
        return "an accepted answer carries no content"
    import jsonschema  # only the elicitation tools need it

    try:
        jsonschema.validate(answer.content, question.params.requested_schema)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None


def _load_state(request_state: str | None) -> dict[str, Any]:
    # The SDK has already verified that this server minted the state, unchanged.
    if not request_state:
        return {}
    loaded = json.loads(request_state)
    return loaded if isinstance(loaded, dict) else {}
