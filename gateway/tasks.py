"""Durable long calls: the MCP Tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663).

A `tools/call` from a client that declared the extension, to a tool that supports tasks, is
answered at once with a task (`resultType: "task"`); the call itself goes on in the background
through the router, to the user's sandbox as any call does, and its outcome is written to
PostgreSQL (core/mcp_tasks.py). The client polls `tasks/get`, which carries the result inline once
the task is terminal, and may `tasks/cancel` it. Any replica answers either: both only read and
write the row, so they work across a gateway restart and while the sandbox hibernates. There is
no `tasks/list` and no `tasks/result` (SEP-2663 removed both): they answer -32601.

A server that asks its client for input mid-task (elicitation, sampling, roots) is held as any
2026-07-28 call's is (gateway/input_required.py): the task turns `input_required` and lists the
questions on `tasks/get`; `tasks/update` delivers answers, and once all are in the call goes on.
The held call lives in the process running the task, which every replica hands `/mcp` to
(gateway/forward.py); on Kubernetes the row keeps that replica's address, and a tasks/update
reaching another replica is passed on to it (gateway/session_routes.py). A tool whose definition also says `inputFirst` asks its first round before
it becomes a task: that round is answered as a plain call's, and the client's retry is the task.

Which tools support tasks is the server's to say, in the tool's definition: `execution.taskSupport`
(`optional` or `required`), or the same under `_meta["io.modelcontextprotocol/tasks"]` for servers
whose SDK cannot set `execution`. A `required` tool refuses a client without the extension (-32021).

A task's work dies with the process running it. That process heartbeats its tasks; a task whose
runner has been silent for `task_orphan_s` is marked failed, with a message saying so, by whichever
replica finds it first (a tasks/get, or the periodic sweep that also deletes expired tasks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types import RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from core.mcp_tasks import TaskRow, TaskStore
from core.tasks import Tasks
from gateway.auth import identity_of
from gateway.catalog import Catalog
from gateway.input_required import RUNNING_AS_TASK, InputExchanges, client_capabilities

log = logging.getLogger(__name__)

EXTENSION = "io.modelcontextprotocol/tasks"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
POLL_INTERVAL_MS = 500
TASK_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})


Ctx = ServerRequestContext[Any, Any]


class TaskIdParams(RequestParams):
    task_id: str


class TaskUpdateParams(TaskIdParams):
    input_responses: dict[str, Any] | None = None


def runner_name() -> str:
    """This gateway process, as the tasks it runs name it (a restarted process is another runner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the client behind this request declared the extension: for its session (2025-11-25),
    in the request's own capabilities (2026-07-28), or for this one request in `_meta`."""
    if EXTENSION in (client_capabilities(ctx).get("extensions") or {}):
        return True
    meta: Mapping[str, Any] = ctx.meta or {}
    per_request = meta.get(CLIENT_CAPABILITIES_META)
    return isinstance(per_request, Mapping) and EXTENSION in (per_request.get("extensions") or {})


def task_support(tool: Mapping[str, Any] | None) -> str:
    """`forbidden`, `optional` or `required`, as the tool's definition says (absent: forbidden)."""
    if tool is None:
        return "forbidden"
    execution = tool.get("execution")
    support = execution.get("taskSupport") if isinstance(execution, Mapping) else None
    if support is None:
        own = (tool.get("_meta") or {}).get(EXTENSION)
        support = own.get("taskSupport") if isinstance(own, Mapping) else None
    return support if support in ("optional", "required") else "forbidden"


def tool_definition(catalog: Catalog, name: str) -> Mapping[str, Any] | None:
    return next((tool for tool in catalog.tools if tool.get("name") == name), None)


def input_first(tool: Mapping[str, Any] | None) -> bool:
    """The tool's server asks its first round of input before the long part: that round is answered
    as a plain call's (input_required), and the client's retry with the answers becomes the task."""
    own = ((tool or {}).get("_meta") or {}).get(EXTENSION)
    return isinstance(own, Mapping) and own.get("inputFirst") is True


def missing_extension(what: str) -> MCPError:
    return MCPError(
        code=types.MISSING_REQUIRED_CLIENT_CAPABILITY,
        message=f"{what} needs the {EXTENSION} extension, which this request did not declare",
        data={"requiredCapabilities": {"extensions": {EXTENSION: {}}}},
    )


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def envelope(row: TaskRow) -> dict[str, Any]:
    """The Task fields, flat, as CreateTaskResult and tasks/get carry them."""
    task: dict[str, Any] = {
        "taskId": row.id, "status": row.status, "createdAt": _iso(row.created_at),
        "lastUpdatedAt": _iso(row.updated_at), "ttlMs": row.ttl_ms, "pollIntervalMs": POLL_INTERVAL_MS,
    }
    if row.status_message:
        task["statusMessage"] = row.status_message
    return task


class TaskCalls:
    """The tasks one gateway process creates and runs, and the three methods that read them."""

    def __init__(self, ttl_ms: int, heartbeat_s: float, sweep_s: float, exchanges: InputExchanges, per_user: int):
        self._per_user = per_user  # tasks one user may run at once
        self._owners: dict[str, int] = {}  # running task id -> its user
        self._exchanges = exchanges  # where a server asking its client for input is held
        self._input_wait_s = exchanges.wait_s  # as long as a held server waits for its client
        self._store: TaskStore | None = None  # from start(), once the database is open
        self._ttl_ms = ttl_ms
        self._heartbeat_s = heartbeat_s
        self._sweep_s = sweep_s
        self._background = Tasks()
        self._running: dict[str, asyncio.Task[None]] = {}  # task id -> its call, in this process
        # task id -> where tasks/update puts the answers its call waits for (input_required)
        self._answers: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            raise MCPError(code=types.INTERNAL_ERROR, message="The gateway is not serving tasks yet")
        return self._store

    def start(self, store: TaskStore) -> None:
        self._store = store
        self._background.spawn(self._heartbeats(), name="tasks-heartbeat")
        self._background.spawn(self._sweeps(), name="tasks-sweep")

    async def close(self) -> None:
        """The process stops: its running calls are cancelled and their tasks failed with the reason
        (better than leaving them for the orphan sweep to find)."""
        running = dict(self._running)
        await self._background.close()
        for task_id in running:
            try:
                await self.store.fail(task_id, types.INTERNAL_ERROR, "The gateway stopped before the task finished; call the tool again.")
            except Exception:  # the database may be gone too: the orphan sweep of another process settles it
                log.warning("could not mark task %s failed at shutdown", task_id, exc_info=True)

    def register(self, server: Server[Any]) -> None:
        """The extension's methods on the gateway's MCP server, and its advertisement."""
        server.extensions[EXTENSION] = {}
        server.add_request_handler("tasks/get", TaskIdParams, self.get)
        server.add_request_handler("tasks/cancel", TaskIdParams, self.cancel)
        server.add_request_handler("tasks/update", TaskUpdateParams, self.update)

    @staticmethod
    async def name_header(ctx: ServerRequestContext[Any, Any], call_next: Any) -> Any:
        """Server middleware: at 2026-07-28 a tasks request names its task in `Mcp-Name` too (SEP-2663's
        routing headers; the SDK checks them only for the core methods), and the two must agree."""
        if ctx.method in TASK_METHODS and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            headers = getattr(ctx.request, "headers", None)
            task_id = (ctx.params or {}).get("taskId")
            if headers is not None and isinstance(task_id, str):
                if decode_header_value(headers.get(MCP_NAME_HEADER)) != task_id:
                    raise MCPError(
                        code=types.HEADER_MISMATCH,
                        message=f"{MCP_NAME_HEADER} header does not match the request body's 'taskId' parameter",
                    )
        return await call_next(ctx)

    # -- creating ------------------------------------------------------------------------------

    async def dispatch(
        self, ctx: Ctx, name: str, tool: Mapping[str, Any] | None, run: Callable[[Ctx], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any] | None:
        """A CreateTaskResult when this call becomes a task; None when it runs as a plain call.
        `run(ctx)` makes the call for the request `ctx` (its input answers in `ctx.params`)."""
        support = task_support(tool)
        if support == "forbidden" or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return None  # the extension is one of 2026-07-28: a 2025-11-25 session's calls run as ever
        if not declared(ctx):
            if support == "required":
                raise missing_extension(f"Tool {name!r} runs only as a task: it")
            return None
        if input_first(tool) and "inputResponses" not in (ctx.params or {}):
            return None  # its first round of input is asked at once (input_required); the retry becomes the task
        identity = identity_of(getattr(ctx.request, "scope", None))
        if identity is None:
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        if sum(1 for owner in self._owners.values() if owner == identity.user_id) >= self._per_user:
            # A task's call runs past its request, so the limits on requests no longer hold it back.
            raise MCPError(
                code=types.INVALID_REQUEST,
                message=f"You have {self._per_user} tasks running already: wait for one to end, or cancel one",
            )
        row = await self.store.create(identity.user_id, name, self._ttl_ms)  # committed: tasks/get finds it at once
        self._owners[row.id] = identity.user_id
        self._running[row.id] = self._background.spawn(self._run(row.id, ctx, run), name=f"mcp-task-{row.id}")
        return {"resultType": "task", **envelope(row)}

    async def _run(self, task_id: str, ctx: Ctx, run: Callable[[Ctx], Awaitable[dict[str, Any]]]) -> None:
        RUNNING_AS_TASK.set(True)
        work = asyncio.ensure_future(self._rounds(task_id, ctx, run))
        watcher = asyncio.ensure_future(self._watch_cancel(task_id, work))
        try:
            await work
        except asyncio.CancelledError:
            # Cancelled by the client (the row says so already) or by the gateway stopping (close() says so).
            raise
        except MCPError as exc:
            await self.store.fail(task_id, exc.error.code, exc.error.message, exc.error.data)
        except Exception as exc:  # never leave a task working forever
            log.exception("task %s failed", task_id)
            await self.store.fail(task_id, types.INTERNAL_ERROR, f"The call failed in the gateway: {type(exc).__name__}")
        finally:
            watcher.cancel()
            self._running.pop(task_id, None)
            self._owners.pop(task_id, None)
            self._answers.pop(task_id, None)

    async def _rounds(self, task_id: str, ctx: Ctx, run: Callable[[Ctx], Awaitable[dict[str, Any]]]) -> None:
        """The call, and a round more each time its server asks the client for input: the task shows the
        questions (input_required) until tasks/update has answered every one, then the call goes on."""
        while True:
            result = await run(ctx)
            if result.get("resultType") != "input_required":
                result.pop("resultType", None)
                await self.store.complete(task_id, result)
                return
            asked: dict[str, Any] = result.get("inputRequests") or {}
            answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            self._answers[task_id] = answers
            await self.store.ask(task_id, asked)
            collected: dict[str, Any] = {}
            while set(asked) - set(collected):
                try:
                    collected.update(await asyncio.wait_for(answers.get(), self._input_wait_s))
                except TimeoutError:  # the held server has been released meanwhile: the call is over
                    raise MCPError(
                        code=types.INTERNAL_ERROR,
                        message=f"No answer to the server's questions came within {self._input_wait_s:g} s.",
                    ) from None
                except asyncio.CancelledError:  # cancelled while waiting: the held server's call ends now
                    self._exchanges.drop(result.get("requestState"))
                    raise
            extra = {"inputResponses": collected}
            if "requestState" in result:
                extra["requestState"] = result["requestState"]
            ctx = dataclasses.replace(ctx, params={**(ctx.params or {}), **extra})

    async def _watch_cancel(self, task_id: str, call: asyncio.Future[Any]) -> None:
        """A tasks/cancel may reach any replica: it writes the row, and the runner stops the call."""
        while not call.done():
            await asyncio.sleep(self._heartbeat_s / 4)
            try:
                if await self.store.status(task_id) in ("cancelled", "failed", None):
                    call.cancel()
                    return
            except Exception:
                log.debug("could not read task %s status", task_id, exc_info=True)

    # -- the methods ---------------------------------------------------------------------------

    def _owner(self, ctx: ServerRequestContext[Any, Any], method: str) -> int:
        if not declared(ctx):
            raise missing_extension(method)
        identity = identity_of(getattr(ctx.request, "scope", None))
        if identity is None:
            raise MCPError(code=types.INVALID_REQUEST, message="Not authenticated")
        return identity.user_id

    @staticmethod
    def _unknown(task_id: str) -> MCPError:
        # The same answer for a task that never was, expired, or is someone else's.
        return MCPError(code=types.INVALID_PARAMS, message=f"No task {task_id!r}")

    async def get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        row = await self.store.get(self._owner(ctx, "tasks/get"), params.task_id)
        if row is None:
            raise self._unknown(params.task_id)
        detailed: dict[str, Any] = {"resultType": "complete", **envelope(row)}
        if row.status == "input_required" and row.input_requests:
            detailed["inputRequests"] = row.input_requests
        elif row.status == "completed" and row.result is not None:
            detailed["result"] = row.result
        elif row.status == "failed" and row.error is not None:
            detailed["error"] = row.error
        return detailed

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> dict[str, Any]:
        outcome = await self.store.cancel(self._owner(ctx, "tasks/cancel"), params.task_id)
        if outcome is None:
            raise self._unknown(params.task_id)
        if outcome and (call := self._running.get(params.task_id)) is not None:
            call.cancel()  # here: at once; on another replica: its watcher sees the row
        return {"resultType": "complete"}

    async def route_of(self, message: Any, user_id: int) -> str | None:
        """The replica running the task a tasks/update (a parsed JSON-RPC message) answers, looked up by
        its owner: a task id of someone else's, or of no task awaiting input, has none."""
        params = message.get("params") if isinstance(message, dict) else None
        task_id = params.get("taskId") if isinstance(params, dict) else None
        if message.get("method") != "tasks/update" or not isinstance(task_id, str) or self._store is None:
            return None
        return await self._store.runner_address(user_id, task_id)

    async def update(self, ctx: ServerRequestContext[Any, Any], params: TaskUpdateParams) -> dict[str, Any]:
        """Answers to what the task's server asked; answers to questions not (or no longer) asked are
        ignored, as the extension says. The task shows only what is still unanswered at once."""
        user_id = self._owner(ctx, "tasks/update")
        row = await self.store.get(user_id, params.task_id)
        if row is None:
            raise self._unknown(params.task_id)
        responses = {k: v for k, v in (params.input_responses or {}).items() if k in (row.input_requests or {})}
        waiting = self._answers.get(params.task_id)
        if responses and waiting is not None:
            await self.store.answer(user_id, params.task_id, list(responses))
            waiting.put_nowait(responses)
        return {"resultType": "complete"}

    # -- upkeep --------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            if self._running:
                try:
                    await self.store.heartbeat()
                except Exception:
                    log.warning("could not heartbeat running tasks", exc_info=True)

    async def _sweeps(self) -> None:
        while True:
            try:
                failed = await self.store.fail_orphans()
                purged = await self.store.purge_expired()
                if failed or purged:
                    log.info("tasks: %d orphaned ones marked failed, %d expired ones purged", failed, purged)
            except Exception:
                log.warning("could not sweep tasks", exc_info=True)
            await asyncio.sleep(self._sweep_s)
