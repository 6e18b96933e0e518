"""The conformance fixture server over stdio, the way the supervisor runs it, in both protocol eras.

The suite itself drives it over Streamable HTTP (tests/test_conformance.py); these tests cover
the stdio path, where elicitation, sampling, roots and logs cross the same pipe as the call.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import (
    CallToolResult,
    CreateMessageResult,
    ElicitResult,
    InputRequiredResult,
    ListRootsResult,
    Root,
    TextContent,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore", category=MCPDeprecationWarning)


class Peer:
    """The client side of elicitation, sampling, roots and logging, recording what it was asked."""

    def __init__(self, answers: dict[str, dict[str, Any]] | None = None):
        self.answers = answers or {}
        self.elicited: list[str] = []
        self.sampled: list[str] = []
        self.logs: list[tuple[str, Any]] = []

    async def elicit(self, context: Any, params: Any) -> ElicitResult:
        self.elicited.append(params.message)
        for fragment, content in self.answers.items():
            if fragment in params.message:
                return ElicitResult(action="accept", content=content)
        return ElicitResult(action="decline")

    async def sample(self, context: Any, params: Any) -> CreateMessageResult:
        self.sampled.append(params.messages[0].content.text)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="Paris"), model="test-model", stop_reason="endTurn"
        )

    async def roots(self, context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri="file:///work/project", name="project")])

    async def log(self, params: Any) -> None:
        self.logs.append((params.level, params.data))


@asynccontextmanager
async def fixture_server(peer: Peer | None = None, mode: str = "auto", **kwargs: Any):
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_servers.conformance"], cwd=str(ROOT))
    callbacks: dict[str, Any] = {}
    if peer is not None:
        callbacks = dict(
            elicitation_callback=peer.elicit,
            sampling_callback=peer.sample,
            list_roots_callback=peer.roots,
            logging_callback=peer.log,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        async with Client(params, mode=mode, **callbacks, **kwargs) as client:
            yield client


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if block.type == "text")


async def test_handshake_era_sends_requests_to_the_client() -> None:
    peer = Peer({"provide": {"username": "ada", "email": "ada@example.com"}})
    async with fixture_server(peer, mode="legacy") as client:
        sampled = await client.call_tool("test_sampling", {"prompt": "Capital of France?"})
        assert text(sampled) == "LLM response: Paris"
        assert peer.sampled == ["Capital of France?"]

        elicited = await client.call_tool("test_elicitation", {"message": "Please provide your details"})
        assert text(elicited) == 'User response: action=accept, content={"email": "ada@example.com", "username": "ada"}'

        # An answer that does not fit the requested schema is not taken as one.
        peer.answers = {"provide": {"username": "ada"}}
        incomplete = await client.call_tool("test_elicitation", {"message": "Please provide your details"})
        assert incomplete.is_error and "email" in text(incomplete)

        roots = await client.call_tool("test_input_required_result_list_roots", {})
        assert text(roots) == "Client roots: file:///work/project (project)"


async def test_handshake_era_log_level_is_honoured() -> None:
    peer = Peer()
    async with fixture_server(peer, mode="legacy") as client:
        await client.set_logging_level("warning")
        await client.call_tool("test_tool_with_logging", {})
        assert peer.logs == []
        await client.set_logging_level("debug")
        await client.call_tool("test_tool_with_logging", {})
        assert [message for _, message in peer.logs] == [
            "Tool execution started",
            "Tool processing data",
            "Tool execution completed",
        ]
        assert {level for level, _ in peer.logs} == {"info"}


async def test_stateless_era_asks_through_input_required_results() -> None:
    peer = Peer({"name": {"name": "Alice"}, "color": {"color": "blue"}})
    async with fixture_server(peer) as client:
        result = await client.call_tool("test_input_required_result_multi_round", {})
        assert text(result) == "Alice's favorite color is blue."
        assert peer.elicited == ["Step 1: What is your name?", "Step 2: What is your favorite color?"]

        several = await client.call_tool("test_input_required_result_multiple_inputs", {})
        assert text(several) == "name: Alice; greeting: Paris; roots: file:///work/project (project)"

        prompt = await client.get_prompt("test_input_required_result_prompt")
        assert prompt.messages[0].content.text == "Use this context: none given"  # the peer declined


async def test_stateless_era_request_state_is_integrity_protected() -> None:
    async with fixture_server(Peer()) as client:
        first = await client.session.call_tool(
            "test_input_required_result_tampered_state", {}, allow_input_required=True
        )
        assert isinstance(first, InputRequiredResult)
        assert list(first.input_requests) == ["confirm"]
        answer = {"confirm": ElicitResult(action="accept", content={"ok": True})}

        with pytest.raises(MCPError) as tampered:
            await client.session.call_tool(
                "test_input_required_result_tampered_state",
                {},
                input_responses=answer,
                request_state=first.request_state + "-TAMPERED",
                allow_input_required=True,
            )
        assert tampered.value.error.code == -32602

        # Answers without the state it issued are not taken: it asks again.
        again = await client.session.call_tool(
            "test_input_required_result_request_state", {}, input_responses=answer, allow_input_required=True
        )
        assert isinstance(again, InputRequiredResult) and again.request_state

        done = await client.session.call_tool(
            "test_input_required_result_request_state",
            {},
            input_responses=answer,
            request_state=again.request_state,
            allow_input_required=True,
        )
        assert isinstance(done, CallToolResult) and text(done).startswith("state-ok")


async def test_stateless_era_refuses_what_the_client_did_not_declare() -> None:
    async with fixture_server() as client:  # no callbacks: no sampling, elicitation or roots
        with pytest.raises(MCPError) as missing:
            await client.call_tool("test_missing_capability", {})
        assert missing.value.error.code == -32021
        assert missing.value.error.data == {"requiredCapabilities": {"sampling": {}}}

        nothing = await client.call_tool("test_input_required_result_capabilities", {})
        assert "nothing to ask" in text(nothing)


async def test_trigger_tools_change_the_lists() -> None:
    async with fixture_server() as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "test_dynamic_tool" not in names
        assert text(await client.call_tool("test_trigger_tool_change", {})) == "test_dynamic_tool added"
        names = {tool.name for tool in (await client.list_tools(cache_mode="refresh")).tools}
        assert "test_dynamic_tool" in names
        assert text(await client.call_tool("test_trigger_tool_change", {})) == "test_dynamic_tool removed"

        assert text(await client.call_tool("test_trigger_prompt_change", {})) == "test_dynamic_prompt added"
        prompts = {prompt.name for prompt in (await client.list_prompts(cache_mode="refresh")).prompts}
        assert "test_dynamic_prompt" in prompts


async def test_handshake_era_announces_list_changes() -> None:
    notices: list[str] = []

    async def on_message(message: Any) -> None:
        notices.append(getattr(message, "method", type(message).__name__))

    async with fixture_server(mode="legacy", message_handler=on_message) as client:
        capabilities = client.session.server_capabilities
        assert capabilities.tools.list_changed is True and capabilities.prompts.list_changed is True
        await client.call_tool("test_trigger_tool_change", {})
        await client.call_tool("test_trigger_prompt_change", {})
        await client.call_tool("test_simple_text", {})  # the notices travel ahead of this answer
    assert notices == ["notifications/tools/list_changed", "notifications/prompts/list_changed"]
