"""The sandbox's only way out: an HTTP proxy on its loopback, relayed to the gateway over the channel.

The sandbox has no network (runsc `--network=none` leaves it a loopback interface and nothing
else). A server whose manifest declares egress hosts is started with HTTPS_PROXY and HTTP_PROXY
naming this proxy with credentials of its own; a server without any gets neither. Every
connection the proxy takes must carry a server's credentials (`Proxy-Authorization: Basic`), so
a neighbour, or code the exec server runs, cannot borrow the way out. The proxy decides nothing
else: it asks the gateway (`tunnel_open`), which checks the host against what that server
declared, resolves and vets the address, connects, audits and rate-limits; then bytes flow both
ways as `tunnel_data` under the window of `wire.Tunnel`.

Credentials alone are not enough where the sandbox's processes share a uid (a pod run as non-root:
`uids`), since a neighbour can read a server's memory and with it the token; where each server has
a uid of its own, its token comes through the launcher's pipe, out of sight. The proxy also asks the
kernel who is on the other end of each connection and serves it only if that is the server or one
of its descendants (`peers`).

CONNECT host:port (https, any TLS: the proxy never sees inside) and plain http requests in
absolute form (`GET http://host/path`, one request per connection) are served.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
from collections.abc import Callable
from typing import Any

from sandbox import wire
from sandbox.supervisor.listener import Gateway, LoopbackListener
from sandbox.supervisor.peers import stranger

HEAD_TIMEOUT = 10.0
OPEN_TIMEOUT = 30.0
"""Seconds the gateway has to resolve, vet and connect."""
REALM = "mcpfleet egress"
PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")


class EgressProxy(LoopbackListener):
    def __init__(self, send: Callable[[Any, Gateway], None], pid_of: Callable[[str], int | None],
                 newest: Callable[[], Gateway | None]):
        """As `LoopbackListener`."""
        super().__init__(send, pid_of, newest)
        self._ids = itertools.count(1)
        self._opening: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.tunnels: dict[int, wire.Tunnel] = {}

    def credentials(self, server: str) -> tuple[str, dict[str, str]]:
        """A new token for `server` and the environment that hands it to it (the proxy's URL in
        the variables urllib, requests, httpx and curl read). Binds the proxy's socket on first use;
        connections wait in its backlog until `serve()`."""
        token = self._new_token(server)
        url = f"http://{server}:{token}@127.0.0.1:{self.port}"
        # The sandbox's own loopback is not out: a server talking to a helper of its own goes direct.
        local = "localhost,127.0.0.1,::1"
        return token, {**{name: url for name in PROXY_ENV}, "NO_PROXY": local, "no_proxy": local}

    # -- from the gateway ---------------------------------------------------------------

    def on_message(self, message: dict[str, Any], gateway: Gateway) -> None:
        """A message from `gateway`, for a tunnel it relays (any other gateway's is ignored)."""
        tunnel_id = message.get("tunnel")
        if not self._relaying(tunnel_id, gateway):
            return
        if message.get("type") == "tunnel_opened":
            waiting = self._opening.pop(tunnel_id, None)  # type: ignore[arg-type]
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
            return
        tunnel = self.tunnels.get(tunnel_id)  # type: ignore[arg-type]
        if tunnel is not None:
            tunnel.receive(message)

    def _drop(self, requests: list[int], reason: str) -> None:
        for tunnel_id in requests:
            waiting = self._opening.pop(tunnel_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result({"error": reason, "status": 502})
            tunnel = self.tunnels.get(tunnel_id)
            if tunnel is not None:
                tunnel.close(reason, tell=False)

    # -- from a server ------------------------------------------------------------------

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return await _reply(writer, 400, "not an HTTP request")
        method, target, version = parts
        headers = [line.split(":", 1) for line in lines[1:] if ":" in line]
        server = self._server_of(next((v.strip() for k, v in headers if k.strip().lower() == "proxy-authorization"), ""))
        if server is None:
            return await _reply(writer, 407, "this server has no egress: no proxy credentials of its own")
        stranger = self._stranger(server, writer.get_extra_info("peername"))
        if stranger is not None:
            return await _reply(writer, 407, stranger)
        if len(self.tunnels) + len(self._opening) >= wire.MAX_TUNNELS:
            return await _reply(writer, 503, f"at most {wire.MAX_TUNNELS} connections at once leave this sandbox")
        forward = b""
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
        else:
            from urllib.parse import urlsplit  # only for a plain http:// request: not held by an idle supervisor

            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                return await _reply(writer, 400, "only CONNECT and http://host/... requests are proxied")
            host, port_text = url.hostname, str(url.port or 80)
            # Origin form, without the proxy's headers, and one request per connection: the
            # next one may be for another host.
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            kept = [f"{k}:{v}" for k, v in headers if k.strip().lower() not in ("proxy-authorization", "proxy-connection", "connection")]
            forward = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1")
        if not host or not port_text.isdigit():
            return await _reply(writer, 400, f"{target!r} names no host:port")
        tunnel_id = next(self._ids)
        if self._take_gateway(tunnel_id) is None:
            return await _reply(writer, 503, "the gateway is not connected to this sandbox; try again")
        try:
            await self._open_and_pump(tunnel_id, server, host, int(port_text), method, forward, reader, writer)
        finally:
            self._release(tunnel_id)

    async def _open_and_pump(self, tunnel_id: int, server: str, host: str, port: int, method: str, forward: bytes,
                             reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Ask the tunnel's gateway to connect, then relay until either end closes."""
        answer = asyncio.get_running_loop().create_future()
        self._opening[tunnel_id] = answer
        self._send(tunnel_id, {"type": "tunnel_open", "tunnel": tunnel_id, "server": server, "host": host, "port": port})
        try:
            opened = await asyncio.wait_for(answer, OPEN_TIMEOUT)
        except asyncio.TimeoutError:
            opened = {"error": "the gateway did not answer in time", "status": 504}
        finally:
            self._opening.pop(tunnel_id, None)
        if opened.get("error") is not None:
            return await _reply(writer, int(opened.get("status") or 502), str(opened["error"]))
        tunnel = wire.Tunnel(tunnel_id, reader, writer, lambda message: self._send(tunnel_id, message))
        self.tunnels[tunnel_id] = tunnel
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                tunnel.forward(forward)
            await tunnel.pump()
        finally:
            self.tunnels.pop(tunnel_id, None)

    def _server_of(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, token = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return None
        for known, server in self._servers_by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()) and server == name:
                return server
        return None

    def _stranger(self, server: str, peer: tuple[str, int] | None) -> str | None:
        """Why the connection from `peer` is not `server`'s own (None: it is)."""
        return stranger(server, self._pid_of(server), peer, self.port or 0)


_REASONS = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required", 429: "Too Many Requests",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


async def _reply(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    """The refusal, with its reason in the status line's body and a header, for tools to show."""
    message = message.replace("\r", " ").replace("\n", " ")
    body = f"mcpfleet egress: {message}\n".encode()
    extra = f'Proxy-Authenticate: Basic realm="{REALM}"\r\n' if status == 407 else ""
    # The reason phrase carries the message too: it is what a client shows of a refused CONNECT
    # (urllib: "Tunnel connection failed: 403 Forbidden: <why>").
    reason = f"{_REASONS.get(status, 'Error')}: {message}"
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\n{extra}X-Mcpfleet-Egress: {message}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1", "replace") + body
    )
    await writer.drain()
