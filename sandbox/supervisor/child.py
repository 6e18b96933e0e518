"""One MCP server, run as a stdio child and spoken to in raw JSON-RPC.

Requests from the gateway get ids of the child's own (so calls from many
gateway requests never collide) and their results go back untouched, to the
gateway connection that sent them (a pod may have several: `link.Listener`).
The child is restarted when it exits; calls it had in flight fail with a clear error.

Its pipes are plain asyncio pipe transports whose callbacks handle output as it
arrives, with no task or scheduled callback in between: under gVisor every
syscall costs, and a call through the supervisor then takes six (two
epoll_wait, and one read and one write on each side).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from sandbox import wire
from sandbox.supervisor import forks
from sandbox.supervisor.calls import Ask, Call
from sandbox.supervisor.config import ServerConfig, SupervisorConfig, python_argv
from sandbox.supervisor.pipes import PipeReader, Pipes

if TYPE_CHECKING:
    from sandbox.supervisor.main import Supervisor

RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
"""A child that ran this long before exiting is restarted without delay growth."""
STOP_GRACE = 2.0
STDERR_TAIL = 20
MIN_SECRET = 6
"""Environment values this long or longer are masked in a server's stderr."""
REFUSED_WHEN_UNAVAILABLE = frozenset({"tools/call", "prompts/get", "resources/read"})
"""What a server marked unavailable (a declared secret is missing) is not asked to do."""

# Notifications about the session rather than one request; never tied to a call.
_SESSION_NOTIFICATIONS = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
    }
)


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class ChildServer:
    def __init__(self, config: ServerConfig, supervisor_config: SupervisorConfig, supervisor: Supervisor):
        self.name = config.name
        self.config = config
        self._supervisor_config = supervisor_config
        self._supervisor = supervisor
        # Only a server that declares egress hosts is told where the egress proxy is, with
        # credentials of its own; the others get no way out at all.
        self._proxy_token: str | None = None
        proxy_env: dict[str, str] = {}
        if config.egress:
            self._proxy_token, proxy_env = supervisor.proxy.credentials(config.name)
        # The same for the model endpoint: only a server that declares inference is told of it.
        self._model_token: str | None = None
        model_env: dict[str, str] = {}
        if config.inference:
            self._model_token, model_env = supervisor.models.credentials(config.name, config.env)
        # And every server is told of the trace endpoint when the gateway exports traces.
        self._trace_token: str | None = None
        trace_env: dict[str, str] = {}
        if supervisor.traces is not None:
            self._trace_token, trace_env = supervisor.traces.credentials(config.name)
        # Servers inherit the sandbox's environment (PATH, PYTHONPATH, HOME) and add their own,
        # which `uids` hands them out of their neighbours' sight.
        self._own_env = {**supervisor_config.env, **config.env, **proxy_env, **model_env, **trace_env}
        # Values given to this server (its secrets and tokens among them) never leave through its stderr.
        self._secrets = sorted(
            {v.encode() for v in (*supervisor_config.env.values(), *config.env.values(), self._proxy_token or "",
                                  self._model_token or "", self._trace_token or "")
             if len(v) >= MIN_SECRET},
            key=len,
            reverse=True,
        )
        # "idle": not started yet (servers start on first use); the first call that needs it starts it.
        self.state = "idle" if supervisor_config.start_servers == "first-use" else "starting"
        self.initialize_result: dict[str, Any] | None = None
        self.error: str | None = None
        self._ready = asyncio.Event()
        self._settled = asyncio.Event()  # set whenever state is not "starting"
        if self.state == "idle":
            self._settled.set()
        self._proc: forks.Process | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._pipes: Pipes | None = None
        self._next_id = 0
        self.pending: dict[int, Call] = {}
        self.asks: dict[int, Ask] = {}  # supervisor's ask key -> the ask
        self._own: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._stopping = False

    # -- status -------------------------------------------------------------------------

    def status(self) -> wire.ServerStatus:
        return {"state": self.state, "initialize": self.initialize_result, "error": self.error, "revision": self.config.revision}

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        if state == "ready":
            self._ready.set()
        else:
            self._ready.clear()
        if state == "starting":
            self._settled.clear()
        else:
            self._settled.set()
        self._supervisor.emit({"type": "server", "server": self.name, **self.status()})

    @property
    def pid(self) -> int | None:
        """The server's process while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def set_starting(self) -> None:
        """An idle server is about to be started (`Supervisor.start_child`)."""
        self._set_state("starting")

    async def wait_settled(self) -> None:
        await self._settled.wait()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the server running until `stop()`: start, wait for exit, restart with backoff."""
        backoff = RESTART_BACKOFF_FIRST
        while not self._stopping:
            started = time.monotonic()
            reason = await self._run_once()
            if self._stopping:
                break
            if time.monotonic() - started > STABLE_AFTER:
                backoff = RESTART_BACKOFF_FIRST
            log(f"server {self.name} {reason}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            if not self._stopping:
                self._set_state("starting")

    async def _run_once(self) -> str:
        """Start the child, handshake, serve until it exits; returns why it stopped, as it is now "failed"."""
        self.initialize_result = None
        self._stderr_tail.clear()
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        try:
            proc = await forks.start_server(
                self._supervisor.forks, self._supervisor.uids, self.name, python_argv(self.config.argv), self.config.cwd,
                self._own_env,
            )
        except (OSError, RuntimeError) as exc:
            failure = f"could not be started: {exc}"
            self._set_state("failed", failure)
            return failure
        pipes = Pipes(self)
        transports = [
            (await loop.connect_read_pipe(lambda: PipeReader(pipes, 1), proc.stdout))[0],
            (await loop.connect_read_pipe(lambda: PipeReader(pipes, 2), proc.stderr))[0],
            (await loop.connect_write_pipe(asyncio.Protocol, proc.stdin))[0],
        ]
        # asyncio watches a write pipe for readability and takes any event on it for the reader
        # having closed it, and closes the child's stdin then. A gVisor restore can raise such an
        # event on a pipe whose reader is alive: the server got EOF, exited 0 and lost its memory.
        # Its exit is told by the process and its stdout; a write to a pipe really closed still fails.
        loop.remove_reader(proc.stdin.fileno())  # type: ignore[union-attr]
        pipes.watch(proc)
        self._proc, self._pipes = proc, pipes
        self._stdin = transports[2]  # type: ignore[assignment]
        reason: str | None = describe_exit(None)  # what it says if this task is cancelled meanwhile
        try:
            reason = await self._initialize(pipes)
            if reason is None:
                how = "forked" if isinstance(proc, forks.ForkedProcess) else "executed"
                log(f"server {self.name} ready in {(time.monotonic() - began) * 1e3:.0f} ms ({how})")
                self._set_state("ready")
            else:
                self.kill()
            await pipes.finished()
            reason = reason or describe_exit(proc.returncode)
        finally:
            if proc.returncode is None:
                self.kill()  # cancelled meanwhile: once forgotten here, nothing else could stop it
            self._stdin = None
            self._proc = self._pipes = None
            for transport in transports:
                transport.close()
            tail = self.stderr_tail()
            if tail:
                reason = f"{reason} (stderr: {tail})"
            # The new state goes out before the failed calls, so whoever sees a failure also knows why.
            self._set_state("failed", reason)
            how = describe_exit(proc.returncode)
            self._fail_pending(f"server {self.name!r} {how} while handling the request")
        return reason

    async def _initialize(self, pipes: Pipes) -> str | None:
        """The MCP handshake; None when it succeeded, else why not."""
        cfg = self._supervisor_config
        params = {
            "protocolVersion": cfg.protocol_version,
            "capabilities": cfg.client_capabilities,
            "clientInfo": {"name": "mcpfleet-supervisor", "version": "1"},
        }
        try:
            response = await asyncio.wait_for(self._own_request("initialize", params), cfg.init_timeout)
        except asyncio.TimeoutError:
            return f"did not answer initialize within {cfg.init_timeout:.0f}s"
        except EOFError:
            await pipes.exited()
            return f"{describe_exit(self._proc.returncode if self._proc else None)} before answering initialize"
        if "error" in response:
            return f"refused initialize: {response['error'].get('message')}"
        self.initialize_result = response.get("result") or {}
        self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return None

    async def _own_request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        # A server that exits at once may close its stdout while its pipes are being connected: then
        # nothing would fail this request, and it would wait out its timeout instead of telling the exit.
        if self._pipes is None or self._pipes.stdout_closed:
            raise EOFError
        self._next_id += 1
        request_id = f"supervisor-{self._next_id}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._own[request_id] = future
        try:
            self._write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
            return await future
        finally:
            self._own.pop(request_id, None)

    async def stop(self) -> None:
        """Close stdin (the stdio way to ask a server to exit), then signal, then kill."""
        self._stopping = True
        self._settled.set()
        if self._proxy_token is not None:
            self._supervisor.proxy.forget(self._proxy_token)
        if self._model_token is not None:
            self._supervisor.models.forget(self._model_token)
        if self._trace_token is not None and self._supervisor.traces is not None:
            self._supervisor.traces.forget(self._trace_token)
        pipes = self._pipes
        if pipes is None:
            return
        if self._stdin is not None:
            self._stdin.close()
        for sig, grace in ((None, STOP_GRACE), (signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
            if sig is not None:
                self._signal(sig)
            try:
                await asyncio.wait_for(asyncio.shield(pipes.exited()), grace)
                return
            except asyncio.TimeoutError:
                continue

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stderr_tail(self) -> str:
        return " | ".join(line for line in self._stderr_tail if line)[-2000:]

    # -- gateway -> child ---------------------------------------------------------------

    def call(self, gateway: int, gateway_id: Any, method: str, params: dict[str, Any] | None, entry: list[Any]) -> None:
        """Send call `gateway_id` of connection `gateway` on; `entry` is the supervisor's record of
        it, filled with our id."""
        if self.config.unavailable and method in REFUSED_WHEN_UNAVAILABLE:
            # It runs (its tools stay listed), but cannot do its work: say why, and what to do.
            self._supervisor.reply_error(gateway, gateway_id, wire.INVALID_PARAMS, self.config.unavailable,
                                         {"server": self.name})
            return
        if self.state == "ready":
            entry[1] = self._send_call(gateway, gateway_id, method, params)
        elif self.state == "idle":
            # Servers start on first use: this call starts it (the state is "starting" before this
            # returns, so a concurrent first call waits for the same start) and waits until it is up.
            self._supervisor.start_child(self)
            asyncio.create_task(self._call_when_ready(gateway, gateway_id, method, params, entry))
        elif self.state == "starting":
            asyncio.create_task(self._call_when_ready(gateway, gateway_id, method, params, entry))
        else:
            message = f"server {self.name!r} is not running: {self.error}"
            self._supervisor.reply_error(gateway, gateway_id, wire.INTERNAL_ERROR, message, {"server": self.name})

    async def _call_when_ready(
        self, gateway: int, gateway_id: Any, method: str, params: dict[str, Any] | None, entry: list[Any]
    ) -> None:
        await self._settled.wait()
        if self._supervisor.call_entry(gateway, gateway_id) is entry:  # not cancelled, its gateway still there
            self.call(gateway, gateway_id, method, params, entry)

    def _send_call(self, gateway: int, gateway_id: Any, method: str, params: dict[str, Any] | None) -> int:
        self._next_id += 1
        child_id = self._next_id
        token = None
        if params is not None:
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                # Tokens come from many clients and may collide; the child sees ours.
                token = meta["progressToken"]
                params = {**params, "_meta": {**meta, "progressToken": child_id}}
        span = None
        traced = wire.traced_params(params)
        if traced is not None:  # the trace goes on: the server's parent is this supervisor's span
            params, span = traced[0], (traced[1], time.time_ns())
        self.pending[child_id] = Call(gateway, gateway_id, token, span)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": child_id, "method": method}
        if params is not None:
            message["params"] = params
        self._write(message)
        return child_id

    def cancel(self, child_id: int, reason: str | None) -> None:
        if self.pending.pop(child_id, None) is None:
            return
        params: dict[str, Any] = {"requestId": child_id}
        if reason:
            params["reason"] = reason
        self._write({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})

    def answer(self, key: int, message: dict[str, Any]) -> None:
        ask = self.asks.pop(key, None)
        if ask is None:
            return
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": ask.request_id}
        if "error" in message:
            reply["error"] = message["error"]
        else:
            reply["result"] = message.get("result") or {}
        self._write(reply)

    def notify(self, method: str, params: dict[str, Any] | None) -> None:
        # Not sent to a server that is not up, an idle one included: what a notification tells
        # (roots changed, a call cancelled) a server learns anew when it starts.
        if self.state != "ready":
            return
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._write(message)

    def drop_gateway_state(self, gateway: int) -> None:
        """Connection `gateway` went away: its calls are cancelled, the asks sent to it refused;
        other gateways' go on."""
        for child_id in [i for i, call in self.pending.items() if call.gateway == gateway]:
            self.cancel(child_id, "the gateway disconnected")
        for key in [k for k, ask in self.asks.items() if ask.gateway == gateway]:
            self.answer(key, {"error": wire.error_object(wire.INTERNAL_ERROR, "the client went away")})

    def _write(self, message: dict[str, Any]) -> None:
        if self._stdin is None or self._stdin.is_closing():
            return
        self._stdin.write(wire.encode(message))

    def _fail_pending(self, message: str) -> None:
        pending, self.pending = self.pending, {}
        self.asks.clear()
        for call in pending.values():
            self._supervisor.reply_error(
                call.gateway, call.gateway_id, wire.INTERNAL_ERROR, f"{message}; it is being restarted",
                {"server": self.name},
            )
        for future in self._own.values():
            if not future.done():
                future.set_exception(EOFError())

    # -- child -> gateway ---------------------------------------------------------------

    def on_stdout_line(self, line: bytes) -> None:
        try:
            message = wire.decode(line)
        except ValueError:
            log(f"[{self.name}] not JSON-RPC on stdout: {line[:200]!r}")
            return
        self._dispatch(message)

    def stdout_unreadable(self, exc: ValueError) -> None:
        log(f"server {self.name}: stdout unreadable ({exc}); stopping it")
        self.kill()

    def on_stdout_closed(self) -> None:
        for future in self._own.values():
            if not future.done():
                future.set_exception(EOFError())
        self.kill()  # a server that closed its stdout can no longer answer

    def on_stderr_line(self, line: bytes) -> None:
        for secret in self._secrets:
            line = line.replace(secret, b"[redacted]")
        self._stderr_tail.append(line.decode(errors="replace").rstrip())
        out = sys.stderr.buffer
        out.write(b"[" + self.name.encode() + b"] " + line + b"\n")
        out.flush()

    def _dispatch(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method is None:
            self._on_response(message)
        elif "id" in message:
            self._on_request(message)
        else:
            self._on_notification(method, message.get("params"))

    def _on_response(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if isinstance(request_id, str):
            future = self._own.get(request_id)
            if future is not None and not future.done():
                future.set_result(message)
            return
        call = self.pending.pop(request_id, None)  # type: ignore[arg-type]
        if call is None:
            return  # cancelled meanwhile
        self._supervisor.untrack_call(call.gateway, call.gateway_id)
        answer: wire.Result | wire.Error
        if "error" in message:
            answer = {"type": "error", "id": call.gateway_id, "error": message["error"]}
        else:
            answer = {"type": "result", "id": call.gateway_id, "result": message.get("result")}
        if call.span is not None:
            answer["span"] = {"id": call.span[0], "start_ns": call.span[1], "end_ns": time.time_ns()}
        self._supervisor.emit(answer, call.gateway)

    def _sole_call(self) -> Call | None:
        """The only call in flight, if there is exactly one.

        Over stdio nothing ties a log message or a sampling request to the
        request that caused it; with one call in flight it can only be that one.
        """
        if len(self.pending) == 1:
            return next(iter(self.pending.values()))
        return None

    def _asking_call(self, params: Any) -> Call | None:
        """The call a server's request belongs to: the one it names, else the sole one."""
        meta = params.get("_meta") if isinstance(params, dict) else None
        named = meta.get(wire.RELATED_REQUEST_META) if isinstance(meta, dict) else None
        call = self.pending.get(named) if isinstance(named, int) else None
        return call if call is not None else self._sole_call()

    def _on_request(self, message: dict[str, Any]) -> None:
        if message["method"] == "ping":
            self._write({"jsonrpc": "2.0", "id": message["id"], "result": {}})
            return
        call = self._asking_call(message.get("params"))
        # The gateway of the call it belongs to answers it; one tied to no call, the newest gateway.
        gateway = call.gateway if call is not None else self._supervisor.newest_gateway()
        if gateway is None:
            self._write({"jsonrpc": "2.0", "id": message["id"],
                         "error": wire.error_object(wire.INTERNAL_ERROR, "no client is connected to answer it")})
            return
        gateway_id = call.gateway_id if call is not None else None
        key = self._supervisor.new_ask(self, gateway)
        self.asks[key] = Ask(message["id"], gateway, gateway_id)
        self._supervisor.emit(
            {
                "type": "ask",
                "ask": key,
                "id": gateway_id,
                "server": self.name,
                "method": message["method"],
                "params": message.get("params"),
            },
            gateway,
        )

    def _on_notification(self, method: str, params: Any) -> None:
        """To the gateway of the call it belongs to; one about the session, or tied to no call,
        to every gateway (each tells the sessions it serves)."""
        call_id, gateway = None, None
        if method == "notifications/progress" and isinstance(params, dict):
            call = self.pending.get(params.get("progressToken"))  # type: ignore[arg-type]
            if call is None:
                return  # progress for a call that is over
            call_id, gateway = call.gateway_id, call.gateway
            params = {**params, "progressToken": call.progress_token}
        elif method == "notifications/cancelled" and isinstance(params, dict):
            # The server withdrew one of its own requests: tell the gateway it went to, in its terms.
            key = next((k for k, ask in self.asks.items() if ask.request_id == params.get("requestId")), None)
            if key is None:
                return
            ask = self.asks.pop(key)
            params = {**params, "requestId": key}
            call_id, gateway = ask.gateway_id, ask.gateway
        elif method not in _SESSION_NOTIFICATIONS:
            sole = self._sole_call()
            if sole is not None:
                call_id, gateway = sole.gateway_id, sole.gateway
        self._supervisor.emit({"type": "note", "id": call_id, "server": self.name, "method": method, "params": params},
                              gateway)


def log(message: str) -> None:
    print(f"supervisor: {message}", file=sys.stderr, flush=True)
