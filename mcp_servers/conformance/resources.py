"""Fixture resources, the resource template, subscriptions, and completion of arguments."""

from __future__ import annotations

import json
from typing import Any

from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    Completion,
    CompletionArgument,
    CompletionContext,
    EmptyResult,
    PromptReference,
    ResourceTemplateReference,
    SubscribeRequestParams,
    UnsubscribeRequestParams,
)

from mcp_servers.conformance.logs import session_id_of
from mcp_servers.conformance.media import PNG

WATCHED = "test://watched-resource"

# What completion/complete offers, per prompt argument or template variable.
SUGGESTIONS: dict[str, list[str]] = {
    "arg1": ["paris", "park", "party", "test", "testing"],
    "arg2": ["world", "word", "work"],
    "resourceUri": ["test://static-text", "test://static-binary", WATCHED],
    "id": ["1", "12", "123"],
}


def register(server: MCPServer[Any]) -> None:
    @server.resource(
        "test://static-text",
        name="static-text",
        description="A static text resource",
        mime_type="text/plain",
    )
    def static_text() -> str:
        return "This is the content of the static text resource."

    @server.resource(
        "test://static-binary",
        name="static-binary",
        description="A static binary resource: a 1x1 red PNG",
        mime_type="image/png",
    )
    def static_binary() -> bytes:
        return PNG

    @server.resource(
        "test://template/{id}/data",
        name="template-data",
        description="Data for the given id",
        mime_type="application/json",
    )
    def template_data(id: str) -> str:  # noqa: A002 - the template variable's name
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"}, separators=(",", ":"))

    @server.resource(
        WATCHED, name="watched-resource", description="A resource clients can subscribe to", mime_type="text/plain"
    )
    def watched() -> str:
        return "Watched resource content"

    @server.completion()
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        candidates = SUGGESTIONS.get(argument.name, [])
        values = [value for value in candidates if value.startswith(argument.value)]
        return Completion(values=values, total=len(values), has_more=False)


class Subscriptions:
    """Which resources each 2025-11-25 session subscribed to (`resources/subscribe`).

    The 2026-07-28 era replaces these requests with `subscriptions/listen`, served by the SDK.
    """

    def __init__(self, server: MCPServer[Any]):
        self._server = server
        self._by_session: dict[str, set[str]] = {}

    async def subscribe(self, ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        uri = str(params.uri)
        if uri not in {str(resource.uri) for resource in await self._server.list_resources()}:
            raise MCPError(code=INVALID_PARAMS, message=f"Resource not found: {uri}", data={"uri": uri})
        self._by_session.setdefault(session_id_of(ctx) or "", set()).add(uri)
        return EmptyResult()

    async def unsubscribe(self, ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        key = session_id_of(ctx) or ""
        uris = self._by_session.get(key)
        if uris is not None:
            uris.discard(str(params.uri))
            if not uris:
                del self._by_session[key]
        return EmptyResult()
