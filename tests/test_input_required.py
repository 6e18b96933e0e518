"""A server asking its 2026-07-28 client for input, through the gateway (gateway/input_required.py).

The `conformance` fixture server runs in the user's sandbox and speaks 2025-11-25 to its
supervisor: it asks by server-to-client requests, which the gateway holds and turns into
`input_required`. Each call here is a plain HTTP POST of its own, with no session, as a
stateless client sends it: a retry reaches the held server only through its `requestState`.
The conformance suite (tests/test_conformance.py) checks the protocol's shapes; these tests
check what the fleet promises beyond it: the state is sealed and bound to its user, nobody
else's retry reaches a waiting server, and a server whose client never comes back is released.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import make_fleet

REVISION = "2026-07-28"
WAIT_S = 20  # how long a server waits for its client's retry in this fleet
HELD = 3  # calls of one user that may wait for input at once in this fleet
ELICIT = "test_input_required_result_elicitation"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Any]:
    running = make_fleet(
        tmp_path_factory, postgres_url,
        MCPFLEET_BARE_TOOL_NAMES="conformance", MCPFLEET_CONFORMANCE="on", MCPFLEET_INPUT_WAIT_S=str(WAIT_S),
        MCPFLEET_INPUT_HELD_PER_USER=str(HELD),
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(fleet: Any) -> dict[str, str]:
    made = {name: fleet.add_user(f"{name}-input") for name in ("alice", "bob", "carol", "dave")}
    for key in made.values():  # their sandboxes start now, not while another's server waits for input
        assert "result" in body(call(fleet, key, "tools/list", {})), "no sandbox"
    return made


def call(fleet: Any, key: str, method: str, params: dict[str, Any], capabilities: dict[str, Any] | None = None) -> httpx.Response:
    """One stateless request: its own connection, the 2026-07-28 envelope in `_meta`."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": REVISION,
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "sampling": {}, "roots": {}}
        if capabilities is None else capabilities,
        "io.modelcontextprotocol/clientInfo": {"name": "input-tests", "version": "1"},
    }
    return httpx.post(
        fleet.mcp_url,
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}},
        headers={
            "Authorization": f"Bearer {key}", "MCP-Protocol-Version": REVISION, "Mcp-Method": method,
            **({"Mcp-Name": params["name"]} if "name" in params else {}), "Accept": "application/json, text/event-stream",
        },
        timeout=180,
    )


def body(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response: the body, or on a stream (a slow answer is kept alive with pings) its last message."""
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    messages = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    answers = [m for m in messages if "result" in m or "error" in m]
    assert answers, response.text[-500:]
    return answers[-1]


def ask_name(fleet: Any, key: str) -> dict[str, Any]:
    """Round one of the elicitation fixture: the gateway answers for the waiting server."""
    result = body(call(fleet, key, "tools/call", {"name": ELICIT, "arguments": {}}))["result"]
    assert result["resultType"] == "input_required", result
    assert result["inputRequests"]["user_name"]["method"] == "elicitation/create"
    assert isinstance(result["requestState"], str)
    return result


def answer_name(fleet: Any, key: str, state: str, name: str) -> dict[str, Any]:
    responses = {"user_name": {"action": "accept", "content": {"name": name}}}
    return body(call(fleet, key, "tools/call", {"name": ELICIT, "arguments": {}, "inputResponses": responses, "requestState": state}))


def test_the_answer_reaches_the_waiting_server_on_another_connection(fleet: Any, keys: dict[str, str]) -> None:
    state = ask_name(fleet, keys["alice"])["requestState"]
    done = answer_name(fleet, keys["alice"], state, "Ada")["result"]
    assert done["resultType"] == "complete"
    assert done["content"][0]["text"] == "Hello, Ada!"  # the server read the answer given on the retry
    # A state is good for one retry: the call is over, the same state again is refused.
    again = answer_name(fleet, keys["alice"], state, "Eve")
    assert again["error"]["code"] == -32602


def test_a_tampered_request_state_is_refused(fleet: Any, keys: dict[str, str]) -> None:
    state = ask_name(fleet, keys["alice"])["requestState"]
    for forged in (state + "-TAMPERED", state[:-4] + ("AAAA" if not state.endswith("AAAA") else "BBBB"), "not-a-state"):
        refused = answer_name(fleet, keys["alice"], forged, "Mallory")
        assert refused["error"]["code"] == -32602, refused
        assert "requestState" in refused["error"]["message"]
    # The genuine state still works: a forgery does not disturb the waiting server.
    assert answer_name(fleet, keys["alice"], state, "Ada")["result"]["content"][0]["text"] == "Hello, Ada!"


def test_another_users_request_state_never_reaches_the_waiting_server(fleet: Any, keys: dict[str, str]) -> None:
    """Attack: bob replays alice's state with his own answer, to feed her server or read her result."""
    state = ask_name(fleet, keys["alice"])["requestState"]
    stolen = answer_name(fleet, keys["bob"], state, "Bob")
    assert stolen["error"]["code"] == -32602, stolen
    assert "Ada" not in str(stolen) and "Bob" not in str(stolen)
    # Alice's server waited on, untouched by bob's answer: hers is the one it reads.
    assert answer_name(fleet, keys["alice"], state, "Ada")["result"]["content"][0]["text"] == "Hello, Ada!"


def test_the_state_is_bound_to_the_call_it_was_issued_for(fleet: Any, keys: dict[str, str]) -> None:
    """A state issued for one tool cannot carry answers into another call."""
    state = ask_name(fleet, keys["alice"])["requestState"]
    responses = {"capital_question": {"role": "assistant", "content": {"type": "text", "text": "x"}, "model": "m"}}
    moved = body(call(fleet, keys["alice"], "tools/call", {
        "name": "test_input_required_result_sampling", "arguments": {}, "inputResponses": responses, "requestState": state,
    }))
    assert moved["error"]["code"] == -32602, moved
    assert answer_name(fleet, keys["alice"], state, "Ada")["result"]["content"][0]["text"] == "Hello, Ada!"


def test_concurrent_calls_of_two_users_keep_their_own_answers(fleet: Any, keys: dict[str, str]) -> None:
    """Nothing leaks between callers: two held servers, answered crosswise in time, each gets its own."""
    first, second = ask_name(fleet, keys["alice"]), ask_name(fleet, keys["bob"])
    third = ask_name(fleet, keys["alice"])
    assert len({first["requestState"], second["requestState"], third["requestState"]}) == 3
    assert answer_name(fleet, keys["bob"], second["requestState"], "Bob")["result"]["content"][0]["text"] == "Hello, Bob!"
    assert answer_name(fleet, keys["alice"], third["requestState"], "Cy")["result"]["content"][0]["text"] == "Hello, Cy!"
    assert answer_name(fleet, keys["alice"], first["requestState"], "Ada")["result"]["content"][0]["text"] == "Hello, Ada!"


def test_a_server_whose_client_never_comes_back_is_released(fleet: Any, keys: dict[str, str]) -> None:
    state = ask_name(fleet, keys["carol"])["requestState"]
    deadline = time.monotonic() + WAIT_S + 120  # generous: the machine may be loaded
    released = ""
    while time.monotonic() < deadline and not released:
        time.sleep(1)
        released = next(
            (line for line in fleet.log_path.read_text().splitlines()
             if "released for want of input" in line and "carol-input" in line), "",
        )
    # The server got the error and its call ended: its own outcome is in the gateway's log.
    assert "did not answer within" in released, released or fleet.log_path.read_text()[-3000:]
    late = answer_name(fleet, keys["carol"], state, "Ada")
    assert late["error"]["code"] == -32602  # the state expired with the wait, and nothing waits for it
    assert "requestState" in late["error"]["message"]


def test_a_missing_client_capability_is_refused_with_32021(fleet: Any, keys: dict[str, str]) -> None:
    response = call(fleet, keys["alice"], "tools/call", {"name": ELICIT, "arguments": {}}, capabilities={"sampling": {}})
    refused = body(response)["error"]
    assert refused["code"] == -32021
    assert refused["data"]["requiredCapabilities"] == {"elicitation": {}}
    assert response.status_code == 400


def test_older_clients_are_asked_as_before(fleet: Any, keys: dict[str, str]) -> None:
    """A 2025-11-25 session keeps its back-channel: the server's request goes to the client itself."""
    import asyncio

    import mcp_types as types

    from tests.clients import connect

    async def run() -> str:
        async def elicit(context: Any, params: Any) -> types.ElicitResult:
            return types.ElicitResult(action="accept", content={"name": "Legacy"})

        async with connect(fleet.mcp_url, keys["bob"], mode="legacy", elicitation_callback=elicit) as client:
            result = await client.call_tool(ELICIT, {})
            return result.content[0].text  # type: ignore[union-attr]

    from tests.test_fast_call import counted, served

    before = served(fleet)
    assert asyncio.run(run()) == "Hello, Legacy!"
    # On the session's fast path: the server's request went on the call's stream, the answer was taken there.
    assert counted(before, served(fleet), "fast", "2025-11-25") == 1


def test_one_user_cannot_hold_servers_without_bound(fleet: Any, keys: dict[str, str]) -> None:
    """Each unanswered call holds a server's call open: past the bound, a new one is refused, and released."""
    states = [ask_name(fleet, keys["dave"])["requestState"] for _ in range(HELD)]
    refused = body(call(fleet, keys["dave"], "tools/call", {"name": ELICIT, "arguments": {}}))
    assert refused["error"]["code"] == -32600 and "waiting for your input" in refused["error"]["message"], refused
    assert ask_name(fleet, keys["alice"])["requestState"]  # another user is not held back by dave's
    # Answering one makes room again.
    assert answer_name(fleet, keys["dave"], states[0], "Dave")["result"]["content"][0]["text"] == "Hello, Dave!"
    assert ask_name(fleet, keys["dave"])["requestState"]
