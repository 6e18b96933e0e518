"""`weather-live`: the current weather from a weather API, called with the user's own API key.

What a tool needs to reach a real service, both declared in its server.json: the secret
(`WEATHER_API_KEY`, each user sets their own: `mcpfleet secrets set USER io.example/weather-live
WEATHER_API_KEY`) and the host it calls (`api.weather-test.example`). In a sandbox, the fleet
hands the server its user's key and an egress proxy in the variables urllib reads (HTTPS_PROXY):
the call below goes through it, to the declared host and nowhere else.

The API is served over TLS with a certificate of its own CA; a `ca.pem` next to this module, when
the package ships one, is trusted for it (the tests' host has such a CA; a public API needs none).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

from mcpfleet_sdk import secret

API = "https://api.weather-test.example/v1/current"
CA = Path(__file__).with_name("ca.pem")

server = MCPServer("weather-live", version="1.0.0", instructions="Current weather, from a weather API.")


class Current(BaseModel):
    city: str
    condition: str
    temp_c: float


@server.tool(description="Get the current weather in a city")
def current(city: str) -> Current:
    key = secret("WEATHER_API_KEY")  # a clear error naming the secret and how to set it, when it is not set
    request = urllib.request.Request(f"{API}?{urllib.parse.urlencode({'city': city})}", headers={"X-Api-Key": key})
    context = ssl.create_default_context(cafile=str(CA) if CA.exists() else None)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:  # the API's answer, without the key: the caller sees why
        raise ToolError(f"the weather API answered {exc.code} {exc.reason}") from None
    return Current(city=answer["city"], condition=answer["condition"], temp_c=answer["temp_c"])


def main() -> None:
    server.run()
