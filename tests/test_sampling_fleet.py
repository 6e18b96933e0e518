"""A server's sampling answered by the fleet's model router (gateway/sampling.py), against the real
local model server (llama-server with Gemma 3 270M, as scripts/models.sh installs it).

The `conformance` fixture server in the user's sandbox asks `sampling/createMessage`. The model is a
tiny base model: these tests check who answered and what was charged to whom, never the wording.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.clients import connect, text_of
from tests.conftest import make_fleet
from tests.test_input_required import body, call

pytestmark = pytest.mark.timeout(900)

POLICY_TENANT = "fleet-samples"  # MCPFLEET_SAMPLING_BY_FLEET names it


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Any]:
    running = make_fleet(
        tmp_path_factory, postgres_url, MCPFLEET_LOCAL_MODEL="on", MCPFLEET_SAMPLING_BY_FLEET=POLICY_TENANT,
        MCPFLEET_BARE_TOOL_NAMES="conformance", MCPFLEET_CONFORMANCE="on",
    )
    running.start()
    try:
        deadline = time.monotonic() + 300
        while "local model gemma-3-270m ready" not in running.log():
            assert time.monotonic() < deadline, running.log()[-2000:]
            time.sleep(0.5)
        running.cli("tenants", "add", POLICY_TENANT)
        yield running
    finally:
        running.stop()


def usage_rows(fleet: Any, tenant: str) -> list[dict[str, Any]]:
    return json.loads(fleet.cli("models", "usage", "--json", "--tenant", tenant).stdout)


def test_a_client_that_cannot_sample_is_answered_by_the_fleet(fleet: Any) -> None:
    """2025-11-25 session without the sampling capability: the fleet's model answers, charged to the caller."""
    alice, bob = fleet.add_user("alice-samples"), fleet.add_user("bob-samples")

    async def run() -> tuple[str, bool]:
        async with connect(fleet.mcp_url, alice, mode="legacy") as client:
            result = await client.call_tool("test_sampling", {"prompt": "Say hello."})
            return text_of(result), bool(result.is_error)

    text, failed = asyncio.run(run())
    assert not failed, text
    assert text.startswith("LLM response: ")  # the server read a CreateMessageResult
    rows = [r for r in usage_rows(fleet, "default") if r["purpose"] == "sampling"]
    assert [(r["user"], r["server"], r["asks"]) for r in rows] == [("alice-samples", "conformance", 1)]
    assert rows[0]["tokens_in"] > 0 and rows[0]["tokens_out"] > 0
    assert bob and all(r["user"] != "bob-samples" for r in usage_rows(fleet, "default"))  # bob never charged for alice


def test_a_client_that_samples_is_still_asked_itself(fleet: Any) -> None:
    """2025-11-25 session with the sampling capability, tenant without the policy: the client answers."""
    import mcp_types as types

    key = fleet.add_user("carol-samples")

    async def run() -> str:
        async def sample(context: Any, params: Any) -> types.CreateMessageResult:
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text="from-the-client"), model="client-model",
            )

        async with connect(fleet.mcp_url, key, mode="legacy", sampling_callback=sample) as client:
            return text_of(await client.call_tool("test_sampling", {"prompt": "Say hello."}))

    assert asyncio.run(run()) == "LLM response: from-the-client"
    assert all(r["user"] != "carol-samples" for r in usage_rows(fleet, "default"))


def test_the_tenant_policy_has_the_fleet_answer_a_2026_client(fleet: Any) -> None:
    """2026-07-28: in a tenant whose policy says the fleet answers, no input_required for sampling."""
    key = fleet.add_user("dora-samples", tenant=POLICY_TENANT)
    result = body(call(fleet, key, "tools/call", {"name": "test_input_required_result_sampling", "arguments": {}},
                       capabilities={}))["result"]
    assert result["resultType"] == "complete", result
    assert result["content"][0]["text"].startswith("The model answered: ")
    rows = usage_rows(fleet, POLICY_TENANT)
    assert [(r["user"], r["server"], r["purpose"]) for r in rows] == [("dora-samples", "conformance", "sampling")]


def test_without_the_policy_a_2026_client_is_asked(fleet: Any) -> None:
    key = fleet.add_user("erin-samples")
    asked = body(call(fleet, key, "tools/call", {"name": "test_input_required_result_sampling", "arguments": {}}))["result"]
    assert asked["resultType"] == "input_required"
    assert [r["method"] for r in asked["inputRequests"].values()] == ["sampling/createMessage"]
