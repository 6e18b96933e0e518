"""A small client of the gateway's HTTP API, for commands run from a developer's or an admin's machine.

`--url` or `MCPFLEET_URL` says where the gateway is (default: where the fleet home's gateway
serves, core/endpoint.py), `--key` or `MCPFLEET_KEY` is the caller's API key. Every answer that is not 2xx becomes a `FleetApiError` with the gateway's
own message, so commands can print it as it is.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT_S = 60.0


class FleetApiError(Exception):
    """A non-2xx answer (or none: `status` is None when the gateway could not be reached)."""

    def __init__(self, status: int | None, message: str, problems: list[str] | None = None):
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.problems = problems or []

    def __str__(self) -> str:
        head = self.message if self.status is None else f"{self.status}: {self.message}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


def _error_of(response: httpx.Response) -> FleetApiError:
    """The gateway answers errors as {"error": ..., "problems": [...]}; anything else is shown as it came."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        problems = body.get("problems")
        listed = [str(p) for p in problems] if isinstance(problems, list) else []
        return FleetApiError(response.status_code, body["error"], listed)
    text = response.text.strip()[:500]
    return FleetApiError(response.status_code, text or response.reason_phrase)


class FleetApi:
    """`with FleetApi.from_env() as api: api.request("GET", "/registry/v1/servers").json()`"""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, timeout: float = TIMEOUT_S):
        self.url = url.rstrip("/")
        self.key = key
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=timeout,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FleetApi:
        env = os.environ if environ is None else environ
        return cls(env.get("MCPFLEET_URL") or DEFAULT_URL, env.get("MCPFLEET_KEY") or None)

    @classmethod
    def for_fleet(cls, url: str | None = None, key: str | None = None) -> FleetApi:
        """`url`/`key` (the flags), else MCPFLEET_URL/MCPFLEET_KEY, else the fleet home's gateway."""
        from core.endpoint import gateway_url
        from core.settings import load_settings

        return cls(gateway_url(load_settings(), url), key or os.environ.get("MCPFLEET_KEY") or None)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one request (httpx's keywords: json, data, files, params, headers); a 2xx answer is returned."""
        try:
            response = self._client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            # The message names the URL but never the key (it travels in a header only).
            raise FleetApiError(
                None, f"cannot reach the gateway at {self.url}: {exc} (is `mcpfleet up` running? "
                "Otherwise set MCPFLEET_URL, or pass --url, to where it serves)",
            ) from None
        if response.status_code == 401:
            # Said in terms of what the caller sets, not of the HTTP header it travels in.
            said = "no API key was given" if self.key is None else "the gateway refused the API key"
            raise FleetApiError(
                401, f"{said} ({self.url}): set MCPFLEET_KEY, or pass --key, to a valid key "
                "(an admin makes one with `mcpfleet keys create USER`)",
            )
        if not response.is_success:
            raise _error_of(response)
        return response

    def whoami(self) -> dict[str, Any]:
        """Who the key belongs to ({"user", "tenant", "role"}): a cheap check of the URL and the key."""
        result: dict[str, Any] = self.request("GET", "/registry/v1/whoami").json()
        return result

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FleetApi:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def add_api_flags(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--key` for a command that talks to the gateway."""
    parser.add_argument(
        "--url", help="the gateway's base URL (default: MCPFLEET_URL, else where `mcpfleet up` of this fleet home serves)"
    )
    parser.add_argument(
        "--key", help="your API key (default: MCPFLEET_KEY); prefer the variable: flags show in the process list"
    )
