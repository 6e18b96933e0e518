"""The only way the gateway fetches from an issuer: JSON over https, to public addresses.

Issuer and JWKS URLs come from tenant admins and from issuers' own metadata,
so a fetch must not become a way into the gateway's network (SSRF). Every
address a name resolves to is vetted when the connection is made, and the
connection goes to the vetted address, so a name that resolves to something
else a moment later (DNS rebinding) gains nothing; redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpcore
import httpx

MAX_BYTES = 512 * 1024
TIMEOUT_S = 5.0

# Cloud instance metadata lives here: never an issuer, whatever the settings say.
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))


class EgressRefused(Exception):
    """A fetch the gateway will not make, or whose answer it will not use; the message says why."""


PRIVATE_ISSUERS_HINT = " (MCPFLEET_ALLOW_PRIVATE_ISSUERS=1 allows it)"


def vet_address(address: str, *, allow_private: bool, hint: str = PRIVATE_ISSUERS_HINT) -> None:
    """Refuse (EgressRefused) a metadata, link-local, multicast or unspecified address, and unless
    `allow_private`, any address not globally routable (private, loopback, reserved, shared, ...);
    `hint` follows the refusal of a private one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA or ip.is_link_local:
        raise EgressRefused(f"{ip} is link-local or a metadata address")
    if ip.is_multicast or ip.is_unspecified:
        raise EgressRefused(f"{ip} is not a unicast address")
    if not allow_private and not ip.is_global:
        raise EgressRefused(f"{ip} is a private or loopback address{hint}")


def vet_url(url: str, *, allow_private: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_private):
        raise EgressRefused(f"{url} is not https (MCPFLEET_ALLOW_PRIVATE_ISSUERS=1 allows http)")
    if not parts.hostname:
        raise EgressRefused(f"{url} names no host")
    try:
        # A literal address is refused before any connection is tried.
        vet_address(parts.hostname, allow_private=allow_private)
    except ValueError:
        pass  # a name: vetted once resolved


class _VettedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, vets every address, then connects to a vetted one (TLS still checks the name)."""

    def __init__(self, allow_private: bool):
        self._allow_private = allow_private
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            vet_address(address, allow_private=self._allow_private)
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to nothing")
        return await self._inner.connect_tcp(addresses[0], port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class VettedTransport(httpx.AsyncBaseTransport):
    """httpx over an httpcore pool whose every connection is vetted."""

    def __init__(self, *, allow_private: bool):
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), network_backend=_VettedBackend(allow_private)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                             target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core)
            body = bytearray()
            async for chunk in response.aiter_stream():  # type: ignore[union-attr]
                body += chunk
                if len(body) > MAX_BYTES:
                    raise EgressRefused(f"{request.url} answered more than {MAX_BYTES} bytes")
            await response.aclose()
        except httpcore.TimeoutException as exc:
            raise httpx.TimeoutException(str(exc), request=request) from None
        except httpcore.NetworkError as exc:
            raise httpx.NetworkError(str(exc), request=request) from None
        except httpcore.ProtocolError as exc:
            raise httpx.ProtocolError(str(exc), request=request) from None
        return httpx.Response(status_code=response.status, headers=response.headers, content=bytes(body),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()


class Egress:
    """Fetches JSON documents from issuers."""

    def __init__(self, *, allow_private: bool):
        self.allow_private = allow_private
        self._http = httpx.AsyncClient(transport=VettedTransport(allow_private=allow_private), timeout=TIMEOUT_S,
                                       follow_redirects=False, headers={"Accept": "application/json"})

    async def get_json(self, url: str) -> dict[str, Any]:
        vet_url(url, allow_private=self.allow_private)
        try:
            response = await self._http.get(url)
        except httpx.HTTPError as exc:
            raise EgressRefused(f"{url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise EgressRefused(f"{url} answered {response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise EgressRefused(f"{url} did not answer JSON") from None
        if not isinstance(document, dict):
            raise EgressRefused(f"{url} did not answer a JSON object")
        return document

    async def aclose(self) -> None:
        await self._http.aclose()
