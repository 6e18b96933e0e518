"""The sample tool that does real work, end to end (tests/tool_projects/weather_live): published and
approved, its user's API key set with `mcpfleet secrets set`, and a call that reaches the weather API
through the sandbox's egress proxy with that key, the API seeing it and the tool returning its answer.

Everything is real (gateway, embedded OpenBao, gVisor sandbox, proxy, channel, TLS) but the API's
name: the gateway resolves it from `MCPFLEET_EGRESS_HOSTS`, which pins it to the test host's public
address in a network namespace this module creates (tests/test_egress.py's), and vets it as it would
DNS's answer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp.shared.exceptions import MCPError

from tests.clients import connect, structured, text_of
from tests.conftest import make_fleet
from tests.test_egress import PUBLIC, make_certificate, namespace_host
from tests.test_registry import ROOT, cli
from tests.test_secrets import secrets_cli

pytestmark = [
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and ip"),
]

API = "api.weather-test.example"
SERVER = "io.example/weather-live"
SAMPLE = ROOT / "tests" / "tool_projects" / "weather_live"

# The weather API: answers a known key, refuses any other, and writes down every key it was shown.
WEATHER_API = r"""
import http.server, json, ssl, sys, urllib.parse
cert, key, seen, good = sys.argv[1:5]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        given = self.headers.get("X-Api-Key", "")
        with open(seen, "a") as f:
            f.write(json.dumps({"path": url.path, "key": given, "host": self.headers.get("Host")}) + "\n")
        if given != good:
            status, body = 401, {"error": "bad API key"}
        else:
            city = urllib.parse.parse_qs(url.query)["city"][0]
            status, body = 200, {"city": city, "condition": "sunny", "temp_c": 21.5}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
https = http.server.ThreadingHTTPServer(("0.0.0.0", 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
https.socket = context.wrap_socket(https.socket, server_side=True)
print("ready", flush=True)
https.serve_forever()
"""


class WeatherApi:
    def __init__(self, work: Path):
        self.cert, self.key = make_certificate(work, API)
        self.seen = work / "seen.jsonl"
        self.seen.touch()
        self.good_key = f"wk-{secrets.token_hex(16)}"

    def requests(self) -> list[dict]:
        return [json.loads(line) for line in self.seen.read_text().splitlines()]


@pytest.fixture(scope="module")
def weather_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeatherApi]:
    work = tmp_path_factory.mktemp("weather-api")
    api = WeatherApi(work)
    with namespace_host(work, WEATHER_API, str(api.cert), str(api.key), str(api.seen), api.good_key, tag="wx"):
        yield api


@pytest.fixture(scope="module")
def weather_fleet(tmp_path_factory, postgres_url, weather_api):
    running = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_EGRESS_HOSTS=f"{API}={PUBLIC}")
    running.start()
    running.keys = {name: running.add_user(name, role=role) for name, role in
                    (("admin-1", "admin"), ("pub-1", "publisher"), ("alice", "member"), ("bob", "member"))}
    # The sample as its developer has it, with the test API's CA beside its module (a public API needs none).
    project = tmp_path_factory.mktemp("projects") / "weather_live"
    shutil.copytree(SAMPLE, project)
    shutil.copy(weather_api.cert, project / "weather_live" / "ca.pem")
    assert "passed" in cli(running, running.keys["pub-1"], "publish", str(project)).stdout
    cli(running, running.keys["admin-1"], "registry", "approve", SERVER, "1.0.0")
    yield running
    running.stop()


async def call(fleet, key: str, city: str):
    async with connect(fleet.mcp_url, key) as client:
        try:
            return await client.call_tool("weather_live__current", {"city": city})
        except MCPError as exc:
            error = exc
    raise error


async def test_the_weather_tool_calls_its_api_with_the_users_key_through_the_egress_proxy(weather_fleet, weather_api):
    fleet, keys = weather_fleet, weather_fleet.keys

    # No key yet: the call fails naming the secret and the command that sets it; the API heard nothing.
    with pytest.raises(MCPError) as refused:
        await call(fleet, keys["alice"], "Paris")
    assert f"mcpfleet secrets set alice {SERVER} WEATHER_API_KEY" in str(refused.value), refused.value
    assert weather_api.requests() == []

    secrets_cli(fleet, "set", "alice", SERVER, "WEATHER_API_KEY", stdin=weather_api.good_key)
    started = time.perf_counter()
    answer = structured(await call(fleet, keys["alice"], "Paris"))
    print(f"\nfirst call with the key set (the server restarts with it) {time.perf_counter() - started:.2f} s")
    assert answer == {"city": "Paris", "condition": "sunny", "temp_c": 21.5}
    assert weather_api.requests() == [{"path": "/v1/current", "key": weather_api.good_key, "host": API}]

    # Bob's own key, a wrong one: the API refuses it, and the tool says so.
    secrets_cli(fleet, "set", "bob", SERVER, "WEATHER_API_KEY", stdin="not-a-good-key")
    wrong = await call(fleet, keys["bob"], "Oslo")
    assert wrong.is_error and "the weather API answered 401" in text_of(wrong), text_of(wrong)
    assert [r["key"] for r in weather_api.requests()] == [weather_api.good_key, "not-a-good-key"]
