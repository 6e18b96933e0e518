"""Where the fleet's gateway answers, for commands run beside it.

`mcpfleet up` records the URL it serves on in the fleet home (`gateway.json`) and removes it when
it stops; a command that talks to the gateway takes, in this order: its `--url`, `MCPFLEET_URL`,
that record, or the URL the settings imply (MCPFLEET_PUBLIC_URL, or MCPFLEET_HOST and MCPFLEET_PORT).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.settings import Settings

RECORD = "gateway.json"
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def record_path(settings: Settings) -> Path:
    return settings.home / RECORD


def served_url(settings: Settings) -> str:
    """The base URL (no `/mcp`) the settings imply."""
    if settings.configured_public_url:
        return settings.configured_public_url.rstrip("/").removesuffix("/mcp")
    host = "127.0.0.1" if settings.host in _ANY_ADDRESS else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


def record(settings: Settings) -> None:
    """Written by the serving gateway once it listens."""
    path = record_path(settings)
    path.write_text(json.dumps({"url": served_url(settings), "pid": os.getpid()}) + "\n", encoding="utf-8")


def forget(settings: Settings) -> None:
    try:
        record_path(settings).unlink()
    except FileNotFoundError:
        pass


def gateway_url(settings: Settings, flag: str | None = None) -> str:
    """The gateway's base URL: the flag, MCPFLEET_URL, the fleet home's record, or the settings."""
    chosen = flag or os.environ.get("MCPFLEET_URL")
    if chosen:
        return chosen.rstrip("/")
    try:
        recorded = json.loads(record_path(settings).read_text(encoding="utf-8")).get("url")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return recorded if isinstance(recorded, str) and recorded else served_url(settings)
