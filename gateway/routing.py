"""The gateway's MCP server: one endpoint whose tools are the caller's own.

Each handler finds the caller's identity on the HTTP request, asks the sandbox
manager for that user's sandbox, and passes the call to the supervisor inside
it. Tools and prompts are namespaced `<server>__<name>`; resource URIs are kept
as the servers give them and routed by lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import mcp_types as types
from mcp.server.caching import CACHEABLE_METHODS, CacheHint
from mcp.server.connection import allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, PromptsListChanged, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp_types.methods import INPUT_REQUIRED_METHODS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import TypeAdapter

from core.accounts import Identity
from core.outage import DatabaseUnavailable
from core.text import bounded
from gateway import tool_errors
from gateway.auth import identity_of
from gateway.breakers import BREAKER_OPEN, Breakers, Verdict, bring_up_verdict, server_verdict
from gateway.catalog import Catalog, build_catalog, same_offers
from gateway.input_required import Exchange, InputExchanges, client_capabilities, relay_to_client, with_client_capabilities
from gateway.request_meta import forwarded_meta
from gateway.sampling import Sampling
from gateway.search_tool import SEARCH_TOOL, SEARCH_TOOL_DEFINITION, search_arguments, search_hits, search_result
from gateway.services import SandboxClient, Services
from gateway.tasks import RUNNING_AS_TASK, TaskCalls, tool_definition
from gateway.tool_sets import ActiveSet, ToolSets, requested_set
from gateway.tracing import channel_hop
from sandbox.channel import RequestHandler
from sandbox.errors import QuotaExceeded, SandboxDetached, SandboxRpcError, SandboxUnavailable

log = logging.getLogger(__name__)

QUOTA_EXCEEDED = -32001
"""JSON-RPC error for a caller whose tenant or node has no room for another running sandbox
(from the implementation-defined server error range)."""
# Codes of errors the gateway raises itself when the sandbox, not the tool, failed.
_SANDBOX_FAILURES = frozenset({types.INTERNAL_ERROR, QUOTA_EXCEEDED, BREAKER_OPEN})
_notification_adapter: TypeAdapter[Any] = TypeAdapter(types.ServerNotification)


class Router:
    def __init__(
        self, fleet: Services, bare_servers: frozenset[str] = frozenset(), breakers: Breakers | None = None,
        tool_sets: ToolSets | None = None, exchanges: InputExchanges | None = None, sampling: Sampling | None = None,
        tasks: TaskCalls | None = None,
    ):
        self._fleet = fleet
        self._tasks = tasks  # None: no call becomes a task (the Tasks extension is not offered)
        # Sandboxes whose start keeps failing, and servers that keep failing, are fenced for a while.
        self._breakers = breakers or Breakers(3, 30.0)
        self._breakers.on_refused = lambda: fleet.telemetry.metrics.refused("breaker")
        self._tool_sets = tool_sets
        # Server-to-client requests held for 2026-07-28 clients (None: such requests fail as before).
        self._exchanges = exchanges
        self._sampling = sampling  # None: a server's sampling always goes to the client
        # The tool set each 2025-11-25 session asked for when it opened holds for the session.
        self._session_sets: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
        self._calls = fleet.calls  # every tool call goes to the audit log: journaled before its answer, written to the database off its path
        # Connected clients per user, to tell them when what they may use changes.
        self._sessions: dict[int, weakref.WeakSet[Any]] = {}
        self._buses: dict[int, InMemorySubscriptionBus] = {}
        self._listen_handlers: dict[int, ListenHandler] = {}
        self._listed: weakref.WeakKeyDictionary[Catalog, list[dict[str, Any]]] = weakref.WeakKeyDictionary()
        # Servers whose tools and prompts keep their own names, for clients that require fixed names.
        self._bare_servers = bare_servers
        # The merged catalog of each sandbox, rebuilt only when a server's own listing changes.
        self._merged: weakref.WeakKeyDictionary[Any, tuple[tuple[tuple[str, Any], ...], Catalog]] = (
            weakref.WeakKeyDictionary()
        )

    def server(self) -> Server[Any]:
        with warnings.catch_warnings():
            # logging/setLevel is gone at 2026-07-28 but 2025-11-25 clients still send it.
            warnings.simplefilter("ignore")
            return self._server()

    def _server(self) -> Server[Any]:
        server: Server[Any] = Server(
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
            on_set_logging_level=self.set_logging_level,
            on_subscriptions_listen=self.listen,
            # What a user sees depends on who they are and may change with any approval:
            # results are theirs alone and stale at once.
            cache_hints={method: CacheHint(ttl_ms=0, scope="private") for method in CACHEABLE_METHODS},
        )
        if self._tasks is not None:
            self._tasks.register(server)
        return server

    @staticmethod
    def notification_options() -> NotificationOptions:
        return NotificationOptions(tools_changed=True, prompts_changed=True, resources_changed=True)

    # -- who is calling, and their sandbox ------------------------------------------------

    async def _client(self, ctx: ServerRequestContext[Any, Any]) -> tuple[Identity, SandboxClient]:
        request = ctx.request
        identity = identity_of(getattr(request, "scope", None))
        if identity is None:
            # The auth middleware refuses unauthenticated requests before they get here.
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        self._remember_session(identity, ctx)
        try:
            with self._breaker(identity, None, bring_up_verdict):
                sandbox = await self._fleet.manager.ensure(identity.user_id, identity.tenant, identity.user)
        except QuotaExceeded as exc:
            raise MCPError(code=QUOTA_EXCEEDED, message=f"No sandbox for you right now: {exc}") from None
        except SandboxUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"Your sandbox could not be started: {exc}") from None
        except DatabaseUnavailable as exc:  # nothing cached recently enough to go on without it
            raise MCPError(code=types.INTERNAL_ERROR, message=str(exc)) from None
        return identity, sandbox.client

    async def _active_set(self, ctx: ServerRequestContext[Any, Any], identity: Identity) -> ActiveSet | None:
        """The tool set this request is under: the key's, or `?set=` (for a session, that of its first request)."""
        if self._tool_sets is None:
            return None
        connection = getattr(ctx.session, "_connection", None)
        if connection is not None and connection in self._session_sets:
            return await self._tool_sets.resolve(identity, self._session_sets[connection])
        return await self._tool_sets.resolve(identity, requested_set(ctx.request))

    async def session_sets(self, ctx: ServerRequestContext[Any, Any], call_next: Any) -> Any:
        """Server middleware: a 2025-11-25 session keeps the tool set its `initialize` asked for, and an
        unknown set fails the handshake itself (a JSON-RPC error at the client's first request)."""
        identity = identity_of(getattr(ctx.request, "scope", None))
        if ctx.method == "initialize" and self._tool_sets is not None and identity is not None:
            requested = requested_set(ctx.request)
            await self._tool_sets.resolve(identity, requested)
            connection = getattr(ctx.session, "_connection", None)
            if connection is not None:
                self._session_sets[connection] = requested
        return await call_next(ctx)

    async def caller_catalog(self, ctx: ServerRequestContext[Any, Any]) -> Catalog:
        """What this caller may call, in the tool set its request is under (gateway/fast_call.py reads schemas here)."""
        return (await self._catalog_in_set(ctx))[2]

    async def _catalog(self, ctx: ServerRequestContext[Any, Any]) -> tuple[Identity, SandboxClient, Catalog]:
        identity, client, catalog, _ = await self._catalog_in_set(ctx)
        return identity, client, catalog

    async def _catalog_in_set(
        self, ctx: ServerRequestContext[Any, Any]
    ) -> tuple[Identity, SandboxClient, Catalog, ActiveSet | None]:
        """The caller's catalog narrowed to the tool set the request is under (the one place sets filter)."""
        identity, client = await self._client(ctx)
        active = await self._active_set(ctx, identity)
        try:
            try:
                per_server = await client.catalog()
            except SandboxDetached:  # it began to hibernate: ensure() waits, then resumes it
                identity, client = await self._client(ctx)
                per_server = await client.catalog()
        except SandboxUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"Your sandbox stopped: {exc}; call again") from None
        registry = self._fleet.registry
        if registry is not None:  # approved servers only, tools whose definitions match their pins only
            try:
                per_server = await registry.guard(identity.user_id, per_server)
            except DatabaseUnavailable as exc:
                raise MCPError(code=types.INTERNAL_ERROR, message=str(exc)) from None
        # The client (and the guard) hand out the same listing objects until a server's listing
        # changes; holding them in the key also keeps their ids from being reused.
        offers = tuple(per_server.items())
        merged = self._merged.get(client)
        if merged is None or not same_offers(merged[0], offers):
            merged = (offers, build_catalog(per_server, self._bare_servers))
            self._merged[client] = merged
        catalog = self._tool_sets.narrow(merged[1], active) if self._tool_sets is not None else merged[1]
        return identity, client, catalog, active

    async def _forward(
        self, ctx: ServerRequestContext[Any, Any], client: SandboxClient, server: str, method: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        identity = identity_of(getattr(ctx.request, "scope", None))
        if (
            self._exchanges is not None and identity is not None
            and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and method in INPUT_REQUIRED_METHODS
        ):
            # No back-channel at 2026-07-28: what the server asks the client becomes input_required.
            declared = client_capabilities(ctx)
            by_fleet = self._sampling is not None and self._sampling.by_fleet(identity, "sampling" in declared, modern=True)
            params = with_client_capabilities(params, {**declared, "sampling": {}} if by_fleet else declared)

            async def start(exchange: Exchange) -> dict[str, Any]:
                # Notifications go to the client request of the round under way (none between rounds).
                asks = self._sampling.or_else(identity, server, exchange.on_request) if by_fleet else exchange.on_request
                return await self._call(ctx, lambda: exchange.ctx, client, server, method, params, asks)

            return await self._exchanges.run(ctx, identity, start)
        on_request = relay_to_client(ctx)
        if identity is not None and self._sampling is not None and self._sampling.by_fleet(
            identity, "sampling" in client_capabilities(ctx), modern=ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        ):
            on_request = self._sampling.or_else(identity, server, on_request)
        return await self._call(ctx, lambda: ctx, client, server, method, params, on_request)

    async def _call(
        self, first: ServerRequestContext[Any, Any], current: Callable[[], ServerRequestContext[Any, Any] | None],
        client: SandboxClient, server: str, method: str, params: dict[str, Any], on_request: RequestHandler,
    ) -> dict[str, Any]:
        """One request to a server for the client request `first`; `current` is the client request its
        notifications go to now (None: dropped)."""
        log_levels = allowed_log_levels(first.protocol_version, first.meta)

        async def relay_notification(n_method: str, n_params: dict[str, Any] | None) -> None:
            if n_method == "notifications/message" and (n_params or {}).get("level") not in log_levels:
                return  # a 2026-07-28 request gets log messages only at the level it asked for
            ctx = current()
            if ctx is None or RUNNING_AS_TASK.get():
                return  # between rounds of input_required, or a task's: no client request to tell
            try:
                notification = _notification_adapter.validate_python(
                    {"method": n_method, **({"params": n_params} if n_params is not None else {})}
                )
            except Exception:
                log.debug("not relaying unknown notification %s from %s", n_method, server)
                return
            await ctx.session.send_notification(notification, related_request_id=ctx.request_id)

        started, identity = time.perf_counter(), identity_of(getattr(first.request, "scope", None))
        try:
            with (
                self._breaker(identity, server, server_verdict),
                channel_hop(server, method, params, relay=self._fleet.telemetry.relay) as traced,  # the trace goes on in traced["_meta"]
            ):
                try:
                    result = await client.request(
                        server, method, traced, on_notification=relay_notification, on_request=on_request
                    )
                except SandboxDetached:  # not sent: the sandbox began to hibernate since it was looked up
                    _, client = await self._client(first)
                    result = await client.request(
                        server, method, traced, on_notification=relay_notification, on_request=on_request
                    )
            return self._result(first, result)
        except SandboxRpcError as exc:
            raise MCPError(code=exc.code, message=exc.message, data=exc.data) from None
        except SandboxUnavailable as exc:
            raise MCPError(
                code=types.INTERNAL_ERROR,
                message=f"Your sandbox stopped during the call ({exc}); the next call starts a fresh one",
            ) from None
        finally:
            log.debug("%s %s/%s took %.1f ms", method, server, params.get("name"), (time.perf_counter() - started) * 1e3)

    def _breaker(self, identity: Identity | None, server: str | None, verdict: Callable[[BaseException], Verdict]) -> Any:
        """The breaker of the user's sandbox bring-up (`server` None) or of one server of theirs."""
        if identity is None:
            return contextlib.nullcontext()
        what = "your sandbox's start" if server is None else f"server {server!r}"
        key = (identity.user_id,) if server is None else (identity.user_id, server)

        def opened(retry_in: float) -> None:  # once per opening: a log line and an audit entry
            log.warning("fencing %s of user %s for %.0fs: it failed repeatedly", what, identity.principal, retry_in)
            if self._calls is not None:
                self._calls.record("breaker.open", "fenced", tenant=identity.tenant, actor=identity.principal,
                                   target=server or "sandbox", detail={"retry_after_s": round(retry_in, 1)})

        return self._breakers.guard(key, what, verdict, opened)

    @staticmethod
    def _result(ctx: ServerRequestContext[Any, Any], result: dict[str, Any]) -> dict[str, Any]:
        """Results from the servers arrive in the handshake era's shape; 2026-07-28 requires `resultType`."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and "resultType" not in result:
            result["resultType"] = "complete"
        return result

    # -- tools ------------------------------------------------------------------------------

    async def list_tools(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        if self._fleet.search is None:
            return self._result(ctx, {"tools": catalog.tools})
        tools = self._listed.get(catalog)
        if tools is None:  # once per catalog: listings stay sorted by name
            tools = self._listed[catalog] = sorted([*catalog.tools, SEARCH_TOOL_DEFINITION], key=lambda t: t["name"])
        return self._result(ctx, {"tools": tools})

    async def call_tool(self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> dict[str, Any]:
        if params.name == SEARCH_TOOL and self._fleet.search is not None:
            return await self._search_tools(ctx, params.arguments or {})
        found = None
        if self._tasks is not None and not RUNNING_AS_TASK.get():  # a task's own run comes back here
            found = await self._catalog_in_set(ctx)
            task = await self._tasks.dispatch(
                ctx, params.name, tool_definition(found[2], params.name), lambda c: self.call_tool(c, params)
            )
            if task is not None:
                return task  # (a call that stays a plain one was not awaited on: `found` is still this call's)
        registry = self._fleet.registry
        if self._calls is None and registry is None:
            return tool_errors.readable(
                await self._call_named(ctx, "tool", "tools/call", params.name, params.arguments, found=found), params.name
            )
        started, outcome, code, where = time.perf_counter(), "sandbox failure", None, {}
        try:
            result = await self._call_named(ctx, "tool", "tools/call", params.name, params.arguments, where, found=found)
            outcome = "tool error" if result.get("isError") else "ok"
            return tool_errors.readable(result, params.name)
        except MCPError as exc:
            outcome, code = ("sandbox failure" if exc.error.code in _SANDBOX_FAILURES else "jsonrpc error"), exc.error.code
            raise
        finally:
            # Usage per tool version for the admin page, and an audit entry: both queued, off the call's path.
            identity = identity_of(getattr(ctx.request, "scope", None))
            elapsed_ms = (time.perf_counter() - started) * 1e3
            server, version = where.get("server", ""), None
            if identity is not None and registry is not None and server:
                version = registry.record_call(identity.user_id, server, where["tool"], outcome == "ok", elapsed_ms)
            if identity is not None and self._calls is not None:
                self._calls.tool_call(identity, tool=params.name, server=server, arguments=params.arguments, version=version,
                                      outcome=outcome, error_code=code, latency_ms=elapsed_ms)
                await self._calls.durable()  # on disk before the answer goes out: a killed gateway loses no entry

    async def _search_tools(self, ctx: ServerRequestContext[Any, Any], arguments: Mapping[str, Any]) -> dict[str, Any]:
        identity = identity_of(getattr(ctx.request, "scope", None))
        if identity is None:
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        query, limit = search_arguments(arguments)
        hits = await search_hits(self._fleet, identity, await self._active_set(ctx, identity), query, limit)
        return self._result(ctx, search_result(hits))

    async def _call_named(
        self, ctx: ServerRequestContext[Any, Any], kind: str, method: str, name: str, arguments: Any,
        where: dict[str, str] | None = None, found: tuple[Identity, SandboxClient, Catalog, ActiveSet | None] | None = None,
    ) -> dict[str, Any]:
        """A tool call or a prompt: find the server by the public name, pass on the server's own name.
        `found`: the caller's catalog as this request just found it (else it is looked up here)."""
        identity, client, catalog, active = found if found is not None else await self._catalog_in_set(ctx)
        registry = self._fleet.registry
        owners = catalog.tool_owner if kind == "tool" else catalog.prompt_owner
        if kind == "tool" and active is not None and not active.allows(name):
            self._fleet.telemetry.metrics.refused("policy")
            raise active.refusal(name)
        if registry is not None and name not in owners:
            reason = registry.why_unavailable(identity.user_id, name, kind)
            if reason is not None:  # a policy or a pin holds it back: say so, not "unknown"
                self._fleet.telemetry.metrics.refused("policy")
                raise MCPError(code=types.INVALID_PARAMS, message=reason)
        server, inner = _owner(owners, name, kind)
        if where is not None:  # tells call_tool which server and tool the call went to
            where.update(server=server, tool=inner)
        forwarded: dict[str, Any] = {"name": inner, "arguments": arguments or {}}
        if meta := forwarded_meta(ctx):
            forwarded["_meta"] = meta
        return await self._forward(ctx, client, server, method, forwarded)

    # -- telling clients what changed ---------------------------------------------------------

    def _remember_session(self, identity: Identity, ctx: ServerRequestContext[Any, Any]) -> None:
        # The connection outlives the request (ctx.session is the request's own, over it; the SDK
        # offers no public way to it). Modern single-exchange connections have no back-channel.
        connection = getattr(ctx.session, "_connection", None)
        if connection is not None and connection.has_standalone_channel:
            self._sessions.setdefault(identity.user_id, weakref.WeakSet()).add(connection)

    async def listen(self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams) -> Any:
        """`subscriptions/listen` (2026-07-28): a stream of the caller's own change events."""
        identity = identity_of(getattr(ctx.request, "scope", None))
        if identity is None:
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        handler = self._listen_handlers.get(identity.user_id)
        if handler is None:
            bus = self._buses[identity.user_id] = InMemorySubscriptionBus()
            handler = self._listen_handlers[identity.user_id] = ListenHandler(bus, max_subscriptions=16)
        return await handler(ctx, params)

    async def tools_changed(self, user_ids: set[int]) -> None:
        """What these users may use changed: their connected clients re-list (2025-11-25 sessions
        get notifications/tools/list_changed, 2026-07-28 listen streams the same event)."""
        log.info("what %d user(s) may use changed; telling their clients", len(user_ids))
        for user_id in user_ids:
            bus = self._buses.get(user_id)
            if bus is not None:
                await bus.publish(ToolsListChanged())
                await bus.publish(PromptsListChanged())
            for connection in list(self._sessions.get(user_id, ())):
                try:
                    await connection.send_tool_list_changed()
                    await connection.send_prompt_list_changed()
                except Exception as exc:  # a client that went away
                    log.debug("could not tell a session of user %s: %s", user_id, exc)

    # -- prompts ----------------------------------------------------------------------------

    async def list_prompts(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return self._result(ctx, {"prompts": catalog.prompts})

    async def get_prompt(self, ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> dict[str, Any]:
        return await self._audited(
            ctx, "prompt.get", params.name, params.arguments,
            lambda where: self._call_named(ctx, "prompt", "prompts/get", params.name, params.arguments, where),
        )

    async def _audited(
        self, ctx: ServerRequestContext[Any, Any], action: str, target: str, arguments: Any,
        run: Callable[[dict[str, str]], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """A prompt got or a resource read, audited as tool calls are (`run` fills in the server it went to)."""
        if self._calls is None:
            return await run({})
        started, outcome, code, where = time.perf_counter(), "sandbox failure", None, {}
        try:
            result = await run(where)
            outcome = "ok"
            return result
        except MCPError as exc:
            outcome, code = ("sandbox failure" if exc.error.code in _SANDBOX_FAILURES else "jsonrpc error"), exc.error.code
            raise
        finally:
            identity = identity_of(getattr(ctx.request, "scope", None))
            registry, server = self._fleet.registry, where.get("server", "")
            version = registry.version_of(identity.user_id, server) if identity is not None and registry is not None and server else None
            if identity is not None:
                self._calls.tool_call(identity, action=action, tool=target, server=server, arguments=arguments, version=version,
                                      outcome=outcome, error_code=code, latency_ms=(time.perf_counter() - started) * 1e3)
                await self._calls.durable()

    # -- resources --------------------------------------------------------------------------

    async def list_resources(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return self._result(ctx, {"resources": catalog.resources})

    async def list_resource_templates(self, ctx: ServerRequestContext[Any, Any], params: Any) -> dict[str, Any]:
        _, _, catalog = await self._catalog(ctx)
        return self._result(ctx, {"resourceTemplates": catalog.templates})

    async def _resource_server(self, ctx: ServerRequestContext[Any, Any], uri: str) -> tuple[Any, str]:
        identity, client, catalog = await self._catalog(ctx)
        owner = catalog.resource_owner.get(uri)
        if owner is None:
            # A resource held back stays so even where an allowed template's pattern covers its URI.
            registry = self._fleet.registry
            reason = registry.why_unavailable(identity.user_id, uri, "resource") if registry is not None else None
            if reason is not None:
                self._fleet.telemetry.metrics.refused("policy")
                raise MCPError(code=types.INVALID_PARAMS, message=reason, data={"uri": uri})
            owner = next((server for template, server in catalog.template_owner if template.match(uri) is not None), None)
        if owner is None:
            raise MCPError(code=types.INVALID_PARAMS, message=f"Resource not found: {bounded(uri)}", data={"uri": bounded(uri)})
        return client, owner

    async def read_resource(self, ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> dict[str, Any]:
        uri = str(params.uri)

        async def read(where: dict[str, str]) -> dict[str, Any]:
            client, server = await self._resource_server(ctx, uri)
            where["server"] = server
            return await self._forward(ctx, client, server, "resources/read", {"uri": uri})

        return await self._audited(ctx, "resource.read", uri, None, read)

    async def subscribe_resource(self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        client, server = await self._resource_server(ctx, uri)
        return await self._forward(ctx, client, server, "resources/subscribe", {"uri": uri})

    async def unsubscribe_resource(self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        client, server = await self._resource_server(ctx, uri)
        return await self._forward(ctx, client, server, "resources/unsubscribe", {"uri": uri})

    # -- logging (2025-11-25) ---------------------------------------------------------------

    async def set_logging_level(self, ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams) -> dict[str, Any]:
        """Passed to every server of the user's sandbox that keeps a log level."""
        _, client, _ = await self._catalog(ctx)
        servers = list(await client.catalog())

        async def set_level(server: str) -> None:
            try:
                await client.request(server, "logging/setLevel", {"level": params.level})
            except SandboxRpcError as exc:
                if exc.code != types.METHOD_NOT_FOUND:
                    log.info("server %s refused logging/setLevel: %s", server, exc.message)

        try:
            await asyncio.gather(*(set_level(server) for server in servers))
        except SandboxUnavailable as exc:
            raise MCPError(code=types.INTERNAL_ERROR, message=f"Your sandbox stopped: {exc}; call again") from None
        return {}

    # -- completion -------------------------------------------------------------------------

    async def complete(self, ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams) -> dict[str, Any]:
        forwarded = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        forwarded.pop("_meta", None)
        if meta := forwarded_meta(ctx):
            forwarded["_meta"] = meta
        ref = forwarded["ref"]
        if ref.get("type") == "ref/prompt":
            _, client, catalog = await self._catalog(ctx)
            server, prompt = _owner(catalog.prompt_owner, ref.get("name", ""), "prompt")
            forwarded["ref"] = {**ref, "name": prompt}
        else:
            client, server = await self._resource_server(ctx, ref.get("uri", ""))
        return await self._forward(ctx, client, server, "completion/complete", forwarded)


def _owner(owners: dict[str, tuple[str, str]], name: str, kind: str) -> tuple[str, str]:
    found = owners.get(name)
    if found is None:
        # The name is the client's, of any size: the error repeats a bounded form of it.
        raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown {kind}: {bounded(name)!r}")
    return found
