"""The gateway's MCP server: one endpoint whose tools are the caller's own.

Each handler finds the caller's identity on the HTTP request, asks the sandbox
manager for that user's sandbox, and passes the call to the supervisor inside
it. Tools and prompts are namespaced `<server>__<name>`; resource URIs are kept
as the servers give them and routed by lookup.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp.shared.uri_template import UriTemplate
from pydantic import BaseModel, ConfigDict, TypeAdapter

from gateway.accounts import Identity
from gateway.auth import identity_of
from sandbox.errors import SandboxRpcError, SandboxUnavailable

log = logging.getLogger(__name__)

SEPARATOR = "__"
_notification_adapter: TypeAdapter[Any] = TypeAdapter(types.ServerNotification)
_request_adapter: TypeAdapter[Any] = TypeAdapter(types.ServerRequest)


class _AnyResult(BaseModel):
    """A client's answer to a relayed request, kept as it came."""

    model_config = ConfigDict(extra="allow")


class SandboxClient(Protocol):
    async def catalog(self) -> Mapping[str, Mapping[str, Any]]: ...

    async def request(self, server: str, method: str, params: dict[str, Any] | None, **kw: Any) -> dict[str, Any]: ...


class SandboxProvider(Protocol):
    async def ensure(self, user_id: int, tenant: str, user: str) -> Any: ...


@dataclass
class Catalog:
    """What one user's servers offer, under the names the gateway shows."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)
    resource_owner: dict[str, str] = field(default_factory=dict)
    template_owner: list[tuple[UriTemplate, str]] = field(default_factory=list)


def build_catalog(per_server: Mapping[str, Mapping[str, Any]]) -> Catalog:
    catalog = Catalog()
    for server in sorted(per_server):
        offer = per_server[server]
        for tool in offer.get("tools") or []:
            catalog.tools.append({**tool, "name": f"{server}{SEPARATOR}{tool['name']}"})
        for prompt in offer.get("prompts") or []:
            catalog.prompts.append({**prompt, "name": f"{server}{SEPARATOR}{prompt['name']}"})
        for resource in offer.get("resources") or []:
            if resource["uri"] in catalog.resource_owner:
                continue  # the first server (by name) keeps a URI two servers claim
            catalog.resource_owner[resource["uri"]] = server
            catalog.resources.append(dict(resource))
        for template in offer.get("resourceTemplates") or []:
            catalog.templates.append(dict(template))
            try:
                catalog.template_owner.append((UriTemplate.parse(template["uriTemplate"]), server))
            except Exception:
                log.warning("server %s offers an unparseable URI template %r", server, template.get("uriTemplate"))
    catalog.tools.sort(key=lambda t: t["name"])
    catalog.prompts.sort(key=lambda p: p["name"])
    return catalog


def split_name(name: str, kind: str) -> tuple[str, str]:
    server, sep, inner = name.partition(SEPARATOR)
    if not sep or not server or not inner:
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown {kind}: {name!r} (names read <server>__<name>)")
    return server, inner


class Router:
    def __init__(self, sandboxes: SandboxProvider):
        self._sandboxes = sandboxes

    def server(self) -> Server[Any]:
        return Server(
            "mcpfleet",
            version="0.1.0",
            instructions="Tools of your own mcpfleet sandbox, named <server>__<tool>.",
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_prompts=self.list_prompts,
            on_get_prompt=self.get_prompt,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
            on_subscribe_resource=self.subscribe_resource,
            on_unsubscribe_resource=self.unsubscribe_resource,
            on_completion=self.complete,
        )

    @staticmethod
    def notification_options() -> NotificationOptions:
        return NotificationOptions(tools_changed=True, prompts_changed=True, resources_changed=True)

    # -- who is calling, and their sandbox ------------------------------------------------

    async def _client(self, ctx: ServerRequestContext[Any, Any]) -> tuple[Identity, Any]:
        request = ctx.request
        identity = identity_of(getattr(request, "scope", None))
        if identity is None:
            # The auth middleware refuses unauthenticated requests before they get here.
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        try:
            sandbox = await self._sandboxes.ensure(identity.user_id, identity.tenant, identity.user)
        except SandboxUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"Your sandbox could not be started: {exc}") from None
        return identity, sandbox.client

    async def _catalog(self, ctx: ServerRequestContext[Any, Any]) -> tuple[Identity, Any, Catalog]:
        identity, client = await self._client(ctx)
        try:
            per_server = await client.catalog()
        except SandboxUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"Your sandbox stopped: {exc}; call again") from None
        return identity, client, build_catalog(per_server)

    async def _forward(
        self, ctx: ServerRequestContext[Any, Any], client: Any, server: str, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        async def relay_notification(n_method: str, n_params: dict[str, Any] | None) -> None:
            try:
                notification = _notification_adapter.validate_python(
                    {"method": n_method, **({"params": n_params} if n_params is not None else {})}
                )
            except Exception:
                log.debug("not relaying unknown notification %s from %s", n_method, server)
                return
            await ctx.session.send_notification(notification, related_request_id=ctx.request_id)

        async def relay_request(r_method: str, r_params: dict[str, Any] | None) -> dict[str, Any]:
            request = _request_adapter.validate_python(
                {"method": r_method, **({"params": r_params} if r_params is not None else {})}
            )
            result = await ctx.session.send_request(
                request, _AnyResult, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
            )
            return result.model_dump(by_alias=True, mode="json", exclude_none=True)

        started = time.perf_counter()
        try:
            return await client.request(
                server, method, params, on_notification=relay_notification, on_request=relay_request
            )
        except SandboxRpcError as exc:
            raise MCPError(code=exc.code, message=exc.message, data=exc.data) from None
        except SandboxUnavailable as exc:
            raise MCPError(
                code=types.INTERNAL_ERROR,
                message=f"Your sandbox stopped during the call ({exc}); the next call starts a fresh one",
            ) from None
        finally:
            log.debug("%s %s/%s took %.1f ms", method, server, params.get("name"), (time.perf_counter() - started) * 1e3)

    # -- tools ------------------------------------------------------------------------------

    async def list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return {"tools": catalog.tools}

    async def call_tool(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> dict[str, Any]:
        server, tool = split_name(params.name, "tool")
        _, client, catalog = await self._catalog(ctx)
        if not any(t["name"] == params.name for t in catalog.tools):
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {params.name!r}")
        forwarded: dict[str, Any] = {"name": tool, "arguments": params.arguments or {}}
        if params.meta is not None:
            forwarded["_meta"] = params.meta.model_dump(by_alias=True, mode="json", exclude_none=True)
        return await self._forward(ctx, client, server, "tools/call", forwarded)

    # -- prompts ----------------------------------------------------------------------------

    async def list_prompts(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return {"prompts": catalog.prompts}

    async def get_prompt(self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> dict[str, Any]:
        server, prompt = split_name(params.name, "prompt")
        _, client, catalog = await self._catalog(ctx)
        if not any(p["name"] == params.name for p in catalog.prompts):
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown prompt: {params.name!r}")
        forwarded = {"name": prompt, "arguments": params.arguments or {}}
        return await self._forward(ctx, client, server, "prompts/get", forwarded)

    # -- resources --------------------------------------------------------------------------

    async def list_resources(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return {"resources": catalog.resources}

    async def list_resource_templates(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return {"resourceTemplates": catalog.templates}

    async def _resource_server(self, ctx: ServerRequestContext[Any, Any], uri: str) -> tuple[Any, str]:
        _, client, catalog = await self._catalog(ctx)
        owner = catalog.resource_owner.get(uri)
        if owner is None:
            owner = next((server for template, server in catalog.template_owner if template.match(uri) is not None), None)
        if owner is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"Resource not found: {uri}", data={"uri": uri})
        return client, owner

    async def read_resource(self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        client, server = await self._resource_server(ctx, uri)
        return await self._forward(ctx, client, server, "resources/read", {"uri": uri})

    async def subscribe_resource(self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        client, server = await self._resource_server(ctx, uri)
        return await self._forward(ctx, client, server, "resources/subscribe", {"uri": uri})

    async def unsubscribe_resource(self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        client, server = await self._resource_server(ctx, uri)
        return await self._forward(ctx, client, server, "resources/unsubscribe", {"uri": uri})

    # -- completion -------------------------------------------------------------------------

    async def complete(self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams) -> dict[str, Any]:
        forwarded = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        ref = forwarded["ref"]
        if ref.get("type") == "ref/prompt":
            server, prompt = split_name(ref["name"], "prompt")
            _, client, catalog = await self._catalog(ctx)
            if not any(p["name"] == ref["name"] for p in catalog.prompts):
                raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown prompt: {ref['name']!r}")
            forwarded["ref"] = {**ref, "name": prompt}
        else:
            client, server = await self._resource_server(ctx, ref.get("uri", ""))
        return await self._forward(ctx, client, server, "completion/complete", forwarded)
