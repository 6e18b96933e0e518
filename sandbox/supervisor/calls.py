"""What a server child keeps of the requests between it and the gateways: a gateway's call it is
working on, and a request of its own sent to a gateway (an ask). Each names the gateway connection
(`link.Gateway`) it belongs to, since several gateways may be attached to one supervisor."""

from __future__ import annotations

from typing import Any


class Call:
    """A gateway request the child is working on: `gateway` the connection it came over and
    `gateway_id` its id there; `span` its id and start when it carries a trace."""

    __slots__ = ("gateway", "gateway_id", "progress_token", "span")

    def __init__(self, gateway: int, gateway_id: Any, progress_token: Any, span: tuple[str, int] | None = None):
        self.gateway = gateway
        self.gateway_id = gateway_id
        self.progress_token = progress_token
        self.span = span


class Ask:
    """A server's request sent to a gateway: the child's id for it, the connection it went to
    (only that one answers it) and the gateway id of the call it belongs to, if known."""

    __slots__ = ("request_id", "gateway", "gateway_id")

    def __init__(self, request_id: Any, gateway: int, gateway_id: Any):
        self.request_id = request_id
        self.gateway = gateway
        self.gateway_id = gateway_id
