"""The supervisor proper: servers on one side, the gateway on the other, routing between them.

On a pod several gateway replicas may be connected at once (`link.Listener`): each message from
a gateway comes with its connection's key (`Gateway`), calls are tracked by (key, id) since each
gateway picks its ids on its own, and whatever answers one goes back over that connection only.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from sandbox import wire
from sandbox.supervisor.child import ChildServer, log
from sandbox.supervisor.config import ServerConfig, SupervisorConfig
from sandbox.supervisor.forks import ForkServer
from sandbox.supervisor.init import run_as_init
from sandbox.supervisor.link import Gateway, Link, Listener
from sandbox.supervisor.models import ModelEndpoint
from sandbox.supervisor.proxy import EgressProxy
from sandbox.supervisor.traces import TraceEndpoint
from sandbox.supervisor.uids import SERVER_UMASK, ServerUids


class Supervisor:
    def __init__(self, config: SupervisorConfig, listen: tuple[str, int] | None = None, token_file: str | None = None):
        """`listen`: (host, port) to listen on TCP for the gateway (a pod), else connect to `config.socket`;
        `token_file`: on TCP, where the token is read anew at every attach."""
        self.config = config
        self.uids = ServerUids(config.server_uids, config.server_gid)
        self.uids.prepare()
        # Only the modules of the servers it runs now: a sandbox without the conformance fixture
        # should not pay for its import.
        used = [m for m in config.fork_modules if any(m in s.argv for s in config.servers)]
        self.forks = ForkServer(config.fork_modules, SERVER_UMASK if self.uids.enabled else -1, preload=used)
        self.proxy = EgressProxy(self.emit, self._pid_of, self.newest_gateway)
        self.models = ModelEndpoint(self.emit, self._pid_of, self.newest_gateway)
        self.traces = TraceEndpoint(self.emit, self._pid_of, self.newest_gateway) if config.traces else None
        self.children = {s.name: ChildServer(s, config, self) for s in config.servers}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self.link: Link | Listener = Listener(*listen, self, token_file) if listen else Link(config.socket, self)
        # (gateway, its call id) -> [child, the child's request id once sent]
        self._calls: dict[tuple[Gateway, Any], list[Any]] = {}
        self._asks: dict[int, tuple[ChildServer, Gateway]] = {}  # ask key -> who asked, who was asked
        self._next_ask = 0
        self._started_at = time.time()

    # -- for the children ---------------------------------------------------------------

    def emit(self, message: wire.SupervisorMessage, to: Gateway | None = None) -> None:
        """To gateway `to`, or to every gateway connected (None)."""
        self.link.send(message, to)

    def newest_gateway(self) -> Gateway | None:
        return self.link.newest()

    def reply_error(self, gateway: Gateway, gateway_id: Any, code: int, message: str, data: Any = None) -> None:
        self._calls.pop((gateway, gateway_id), None)
        self.emit({"type": "error", "id": gateway_id, "error": wire.error_object(code, message, data)}, gateway)

    def untrack_call(self, gateway: Gateway, gateway_id: Any) -> None:
        self._calls.pop((gateway, gateway_id), None)

    def call_entry(self, gateway: Gateway, gateway_id: Any) -> list[Any] | None:
        return self._calls.get((gateway, gateway_id))

    def new_ask(self, child: ChildServer, gateway: Gateway) -> int:
        """A key for a request of `child` sent to `gateway` (keys are the supervisor's: unique across gateways)."""
        self._next_ask += 1
        self._asks[self._next_ask] = (child, gateway)
        return self._next_ask

    def start_child(self, child: ChildServer) -> None:
        """Start an idle server (servers start on first use): it is "starting" when this returns."""
        if child.name in self._runs or self.children.get(child.name) is not child:
            return
        log(f"server {child.name} starts on first use")
        child.set_starting()
        self._runs[child.name] = asyncio.get_running_loop().create_task(child.run())

    def _pid_of(self, server: str) -> int | None:
        child = self.children.get(server)
        return child.pid if child is not None else None

    def hello(self, token: str | None = None) -> wire.Hello:
        """`token`: the one the gateway attached with, when it is no longer the config's (a claimed pool pod)."""
        return {
            "type": "hello",
            "token": self.config.token if token is None else token,
            "servers": {name: child.status() for name, child in self.children.items()},
            "supervisor": {"pid": os.getpid(), "started_at": self._started_at},
        }

    # -- from the gateway ---------------------------------------------------------------

    def on_message(self, message: dict[str, Any], gateway: Gateway) -> None:
        """A message from connection `gateway`: it reaches only that gateway's calls and asks."""
        kind = message.get("type")
        if kind == "call":
            self._on_call(message, gateway)
        elif kind == "cancel":
            entry = self._calls.pop((gateway, message.get("id")), None)
            if entry is not None and entry[1] is not None:
                entry[0].cancel(entry[1], message.get("reason"))
        elif kind == "answer":
            key = message.get("ask")
            asked = self._asks.get(key)  # type: ignore[arg-type]
            if asked is not None and asked[1] == gateway:  # only the gateway asked answers
                del self._asks[key]  # type: ignore[arg-type]
                asked[0].answer(key, message)  # type: ignore[arg-type]
        elif kind == "notify":
            server = message.get("server")
            for child in self.children.values() if server is None else [self.children.get(server)]:
                if child is not None:
                    child.notify(message["method"], message.get("params"))
        elif kind == "ping":
            self.emit({"type": "pong", "id": message.get("id")}, gateway)
        elif kind in ("tunnel_opened", "tunnel_data", "tunnel_ack", "tunnel_close"):
            self.proxy.on_message(message, gateway)
        elif kind == "model_reply":
            self.models.on_message(message, gateway)
        elif kind == "warm":
            asyncio.get_running_loop().create_task(self._warm(gateway, message.get("id"), list(message.get("modules") or [])))
        elif kind == "cloned":
            self._cloned(gateway, message.get("id"), str(message.get("token") or ""))
        elif kind == "configure":
            servers = [ServerConfig(**s) for s in message.get("servers") or []]
            asyncio.get_running_loop().create_task(self._configure(gateway, message.get("id"), servers))
        else:
            log(f"ignoring a message of unknown type {kind!r}")

    def _on_call(self, message: dict[str, Any], gateway: Gateway) -> None:
        gateway_id = message.get("id")
        server = message.get("server")
        child = self.children.get(server)  # type: ignore[arg-type]
        if child is None:
            self.reply_error(
                gateway,
                gateway_id,
                wire.INVALID_PARAMS,
                f"no server named {server!r} in this sandbox",
                {"servers": sorted(self.children)},
            )
            return
        entry = [child, None]
        self._calls[(gateway, gateway_id)] = entry
        child.call(gateway, gateway_id, message.get("method", ""), message.get("params"), entry)

    async def _configure(self, gateway: Gateway, request_id: Any, servers: list[ServerConfig]) -> None:
        """Run exactly these servers: stop the ones no longer wanted or changed, start the new ones.

        The gateway sends this when what its user may run changed (an approval came or went,
        or a new revision of a server was approved) while the sandbox was running or hibernated.
        """
        wanted = {s.name: s for s in servers}
        going = [c for name, c in self.children.items() if wanted.get(name) != c.config]
        for child in going:
            del self.children[child.name]
        await asyncio.gather(*(child.stop() for child in going))
        for child in going:
            task = self._runs.pop(child.name, None)
            if task is not None:
                task.cancel()
            if child.name not in wanted:
                self.emit({"type": "server", "server": child.name, "state": "removed"})
        new = [ChildServer(s, self.config, self) for name, s in wanted.items() if name not in self.children]
        for child in new:
            self.children[child.name] = child
            if child.state != "idle":  # else it starts on first use
                self._runs[child.name] = asyncio.get_running_loop().create_task(child.run())
        self._serve_endpoints()
        await asyncio.gather(*(child.wait_settled() for child in new))
        log(f"configured: {', '.join(f'{n}: {c.state}' for n, c in self.children.items()) or 'no servers'}")
        self.emit({"type": "result", "id": request_id, "result": {"servers": {n: c.status() for n, c in self.children.items()}}},
                  gateway)

    async def _warm(self, gateway: Gateway, request_id: Any, modules: list[str]) -> None:
        """A template (`sandbox.templates`): the fork server up, its imports done, before the checkpoint."""
        warm = bool(self.forks.modules) and await asyncio.to_thread(self.forks.warm, modules, self.config.init_timeout)
        self.emit({"type": "result", "id": request_id, "result": {"forks": warm}}, gateway)

    def _cloned(self, gateway: Gateway, request_id: Any, token: str) -> None:
        """This supervisor was restored from a template's checkpoint as a new sandbox: its hellos carry
        the clone's own token from now on, and what it did to the template's workspace at its start
        is done to the clone's, before any server runs (in line, as at a start: no server runs yet)."""
        if token:
            self.config = dataclasses.replace(self.config, token=token)
        self.uids.prepare()
        self.emit({"type": "result", "id": request_id, "result": {}}, gateway)

    def on_connect(self, gateway: Gateway) -> None:
        """A gateway is there (again, after a detach, a restore, a gateway restart; or one more replica)."""
        self._serve_endpoints()

    def _endpoints(self) -> list[EgressProxy | ModelEndpoint | TraceEndpoint]:
        return [self.proxy, self.models, *([self.traces] if self.traces is not None else [])]

    def _serve_endpoints(self) -> None:
        for endpoint in self._endpoints():
            endpoint.serve()

    def on_detach(self) -> None:
        """Before the channel closes for a checkpoint: nothing in the sandbox may wait on a
        loopback socket then, and no tunnel can survive it anyway."""
        for endpoint in self._endpoints():
            endpoint.pause()
            endpoint.drop_all("the sandbox is being saved")

    def on_disconnect(self, gateway: Gateway) -> None:
        """Calls of a gateway that went away can never be answered: cancel them, and end its asks,
        tunnels and model requests. Other gateways' go on."""
        for call in [c for c in self._calls if c[0] == gateway]:
            del self._calls[call]
        for ask in [k for k, (_, asked) in self._asks.items() if asked == gateway]:
            del self._asks[ask]
        for endpoint in self._endpoints():
            endpoint.drop_gateway(gateway, "the gateway went away")
        for child in self.children.values():
            child.drop_gateway_state(gateway)
        if self.link.connected:
            # Other gateways are still attached (a pod): what one gateway's detach paused serves them
            # again, since no checkpoint follows there. Over the Unix socket none is left by now.
            self._serve_endpoints()

    # -- running ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log(f"up at {time.time():.3f}")  # wall clock, which gVisor shares with the host: for bench/sandbox_lifecycle.py
        self._serve_endpoints()
        lazy = self.config.start_servers == "first-use"
        if self.forks.preload and not lazy:
            # Its imports go on while the servers that are executed start. With none of its servers
            # to run now (a trial of a published server, or servers started on first use) it is not
            # started: the first fork starts it.
            self.forks.start()
        if not lazy:
            self._runs = {name: asyncio.create_task(child.run()) for name, child in self.children.items()}
        # The first hello should say how every server fared, so connect once all have settled.
        await asyncio.gather(*(child.wait_settled() for child in self.children.values()))
        log(", ".join(f"{name}: {child.state}" for name, child in self.children.items()) or "no servers")
        link = asyncio.create_task(self.link.run())
        await stop.wait()
        log("stopping")
        link.cancel()
        for endpoint in self._endpoints():
            endpoint.close()
        await asyncio.gather(*(child.stop() for child in self.children.values()))
        await asyncio.to_thread(self.forks.close)
        for task in self._runs.values():
            task.cancel()
        await asyncio.gather(link, *self._runs.values(), return_exceptions=True)
        return 0


USAGE = "usage: python -m sandbox.supervisor [--listen HOST:PORT [--token-file PATH]] CONFIG.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, config_path = _parse(argv)
        listen = _address(options["--listen"]) if "--listen" in options else None
    except ValueError as exc:
        print(f"{exc}\n{USAGE}", file=sys.stderr)
        return 2
    keep_memory_private()
    config = SupervisorConfig.consume(config_path)
    if "--token-file" in options:
        # A pod has its token from its Secret's volume rather than from the config.
        with open(options["--token-file"]) as f:
            config = dataclasses.replace(config, token=f.read().strip())
    keep_read_buffers_off_mmap()
    token_file = options.get("--token-file")
    return run_as_init(lambda: asyncio.run(Supervisor(config, listen, token_file).run()))


def _parse(argv: list[str]) -> tuple[dict[str, str], str]:
    """Options (each with a value) and the one config path; argparse is more than this needs
    and prints to stdout, which the sandbox's log takes."""
    options: dict[str, str] = {}
    rest = list(argv)
    while rest and rest[0].startswith("--"):
        name = rest.pop(0)
        if name not in ("--listen", "--token-file") or not rest:
            raise ValueError(f"unknown option or missing value: {name}")
        options[name] = rest.pop(0)
    if len(rest) != 1:
        raise ValueError("one CONFIG.json expected")
    return options, rest[0]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


PR_SET_DUMPABLE = 4
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_memory_private() -> None:
    """Servers and code they run may share the supervisor's uid (where it is not root: `uids`); not
    being dumpable keeps them out of its memory and /proc files (its token, and every server's environment)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def keep_read_buffers_off_mmap() -> None:
    """asyncio reads into fresh 256 KiB buffers; glibc would mmap and munmap each one (or,
    from the heap, grow and trim it with brk). Raising both thresholds keeps them in the
    heap: three syscalls fewer per message, which matters under gVisor, where every
    syscall is expensive.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 16 * 1024 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: no harm, only slower
