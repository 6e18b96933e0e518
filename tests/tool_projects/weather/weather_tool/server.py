"""`weather-tool`: the forecast and alerts, over MCP on stdio.

The data is derived from the names asked about (a CRC, not Python's salted `hash`), so
every run, on every machine, answers the same: tests can compare exact values.
"""

from __future__ import annotations

import zlib

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

server = MCPServer("weather", version="1.0.0", instructions="Weather forecasts and alerts.")

CONDITIONS = ("sunny", "cloudy", "rain", "snow", "fog", "wind")


class Day(BaseModel):
    day: int
    condition: str
    high_c: int
    low_c: int


class Forecast(BaseModel):
    city: str
    days: list[Day]


class Alerts(BaseModel):
    region: str
    alerts: list[str]


def _seed(text: str) -> int:
    return zlib.crc32(text.strip().lower().encode())


@server.tool(description="Get the weather forecast for a city")
def forecast(city: str) -> Forecast:
    seed = _seed(city)
    days = []
    for day in range(3):
        value = seed >> (day * 8)
        low = value % 15 - 2
        days.append(Day(day=day, condition=CONDITIONS[value % len(CONDITIONS)], high_c=low + 4 + value % 7, low_c=low))
    return Forecast(city=city, days=days)


@server.tool(description="List the active weather alerts for a region")
def alerts(region: str) -> Alerts:
    found = ["high wind warning", "flood watch"][: _seed(region) % 3]
    return Alerts(region=region, alerts=found)


def main() -> None:
    server.run()
