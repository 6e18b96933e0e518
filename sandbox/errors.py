"""What the gateway sees when a sandbox call does not return a result."""

from __future__ import annotations

from typing import Any

from sandbox import wire


class SandboxError(Exception):
    """Base of the errors this package raises."""


class SandboxUnavailable(SandboxError):
    """The sandbox could not be started, has died, or its channel broke mid-call."""


class SandboxDetached(SandboxUnavailable):
    """The gateway let go of the sandbox's channel on purpose (it is hibernating or being
    reclaimed) before the call was sent: asking the sandbox manager again is safe."""


class QuotaExceeded(SandboxUnavailable):
    """The caller may not have a running sandbox now: a tenant's or the node's cap is reached."""


class SandboxRpcError(SandboxError):
    """A server inside the sandbox answered with a JSON-RPC error; passed on as it came."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_error(cls, error: dict[str, Any]) -> SandboxRpcError:
        return cls(int(error.get("code", -32603)), str(error.get("message", "")), error.get("data"))

    def to_error(self) -> wire.ErrorObject:
        return wire.error_object(self.code, self.message, self.data)
