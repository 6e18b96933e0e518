"""Fixture tools and prompts that need the client: elicitation, sampling, roots.

Each asks through `ClientInput`, so it works in both eras: on 2025-11-25 it sends the
request and waits; on 2026-07-28 it answers with `InputRequiredResult` and finishes
when the client retries with the answers.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer, UserMessage
from mcp_types import (
    CallToolResult,
    CreateMessageResult,
    ElicitResult,
    InputRequiredResult,
    ListRootsResult,
    TextContent,
)
from pydantic import BaseModel, Field

from mcp_servers.conformance.client_input import ClientInput, elicitation, roots, sampling

Asked = CallToolResult | InputRequiredResult

NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}

SEP1034_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
}

SEP1330_SCHEMA = {
    "type": "object",
    "properties": {
        "untitledSingle": {
            "type": "string",
            "description": "Single choice, options without titles",
            "enum": ["option1", "option2", "option3"],
        },
        "titledSingle": {
            "type": "string",
            "description": "Single choice, options with titles",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "description": "Single choice, titles in the deprecated enumNames",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {
            "type": "array",
            "description": "Several choices, options without titles",
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
        "titledMulti": {
            "type": "array",
            "description": "Several choices, options with titles",
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
}


def register(server: MCPServer[Any]) -> None:
    @server.tool(description="Asks the client's model to answer the prompt (sampling) and returns its answer.")
    async def test_sampling(
        prompt: Annotated[str, Field(description="The prompt to send to the model")], ctx: Context
    ) -> Asked:
        answers = await ClientInput(ctx).ask({"sampling": sampling(prompt, 100)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"LLM response: {_sampled_text(answers['sampling'])}")

    @server.tool(description="Asks the user for a username and an email address (elicitation) and returns the answer.")
    async def test_elicitation(
        message: Annotated[str, Field(description="The message to show the user")], ctx: Context
    ) -> Asked:
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        answers = await ClientInput(ctx).ask({"user_info": elicitation(message, schema)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"User response: {_outcome(answers['user_info'])}")

    @server.tool(description="Asks the user for a form whose fields of every primitive type carry defaults (SEP-1034).")
    async def test_elicitation_sep1034_defaults(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask(
            {"user_info": elicitation("Please review and update the form fields with defaults", SEP1034_SCHEMA)}
        )
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"Elicitation completed: {_outcome(answers['user_info'])}")

    @server.tool(description="Asks the user to choose from each of the five kinds of enum field (SEP-1330).")
    async def test_elicitation_sep1330_enums(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask(
            {"choices": elicitation("Please select options from the enum fields", SEP1330_SCHEMA)}
        )
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"Elicitation completed: {_outcome(answers['choices'])}")

    @server.tool(
        description="Needs the client's sampling capability: asks the model to say hello. A client that did "
        "not declare sampling gets a MissingRequiredClientCapability error (-32021)."
    )
    async def test_missing_capability(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask({"hello": sampling("Say hello.", 20)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"The model said: {_sampled_text(answers['hello'])}")

    @server.tool(
        description="Asks the user's name mid-call. On 2026-07-28 the question rides the result "
        "(InputRequiredResult), never a request of its own on the response stream."
    )
    async def test_streaming_elicitation(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask({"user_name": elicitation("What is your name?", NAME_SCHEMA)})
        if isinstance(answers, InputRequiredResult):
            return answers
        answer = _elicited(answers["user_name"])
        return _text(
            f"Hello, {answer.content['name']}!" if answer.action == "accept" and answer.content else "No name given."
        )

    @server.tool(description="Asks the user's name (key user_name) and greets them.")
    async def test_input_required_result_elicitation(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask({"user_name": elicitation("What is your name?", NAME_SCHEMA)})
        if isinstance(answers, InputRequiredResult):
            return answers
        answer = _elicited(answers["user_name"])
        if answer.action != "accept" or answer.content is None:
            return _text(f"No name given (the user chose {answer.action}).")
        return _text(f"Hello, {answer.content['name']}!")

    @server.tool(description="Asks the client's model for the capital of France (key capital_question).")
    async def test_input_required_result_sampling(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask({"capital_question": sampling("What is the capital of France?", 100)})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"The model answered: {_sampled_text(answers['capital_question'])}")

    @server.tool(description="Asks the client for its roots (key client_roots) and lists them.")
    async def test_input_required_result_list_roots(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask({"client_roots": roots()})
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"Client roots: {_root_list(answers['client_roots'])}")

    @server.tool(
        description="Asks for a confirmation (key confirm) with request state, and completes only when the "
        "answer comes back together with that state (reporting state-ok)."
    )
    async def test_input_required_result_request_state(ctx: Context) -> Asked:
        inputs = ClientInput(ctx)
        answers = await inputs.ask({"confirm": _confirmation()}, note="confirm", needs_state=True)
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"state-ok: the request state came back intact; {_outcome(answers['confirm'])}")

    @server.tool(
        description="Asks for three things at once: the user's name (elicitation), a greeting (sampling) "
        "and the client's roots."
    )
    async def test_input_required_result_multiple_inputs(ctx: Context) -> Asked:
        answers = await ClientInput(ctx).ask(
            {
                "user_name": elicitation("What is your name?", NAME_SCHEMA),
                "greeting": sampling("Generate a greeting", 50),
                "client_roots": roots(),
            }
        )
        if isinstance(answers, InputRequiredResult):
            return answers
        name = _elicited(answers["user_name"])
        who = name.content["name"] if name.action == "accept" and name.content else f"({name.action})"
        return _text(
            f"name: {who}; greeting: {_sampled_text(answers['greeting'])}; roots: {_root_list(answers['client_roots'])}"
        )

    @server.tool(
        description="Asks two questions in two rounds: the user's name (step1), then their favorite color (step2)."
    )
    async def test_input_required_result_multi_round(ctx: Context) -> Asked:
        inputs = ClientInput(ctx)
        first = await inputs.ask({"step1": elicitation("Step 1: What is your name?", NAME_SCHEMA)}, note="step1")
        if isinstance(first, InputRequiredResult):
            return first
        color_schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
        second = await inputs.ask(
            {
                "step1": elicitation("Step 1: What is your name?", NAME_SCHEMA),
                "step2": elicitation("Step 2: What is your favorite color?", color_schema),
            },
            note="step2",
        )
        if isinstance(second, InputRequiredResult):
            return second
        name, color = _elicited(second["step1"]), _elicited(second["step2"])
        if name.action != "accept" or color.action != "accept" or not name.content or not color.content:
            return _text(f"Not answered (step 1: {name.action}, step 2: {color.action}).")
        return _text(f"{name.content['name']}'s favorite color is {color.content['color']}.")

    @server.tool(
        description="Asks for a confirmation with integrity-protected request state; a retry whose state was "
        "altered is refused with a JSON-RPC error."
    )
    async def test_input_required_result_tampered_state(ctx: Context) -> Asked:
        # The SDK seals the state it sends and verifies what comes back; altered state never gets here.
        answers = await ClientInput(ctx).ask({"confirm": _confirmation()}, note="confirm", needs_state=True)
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"The request state verified; {_outcome(answers['confirm'])}")

    @server.tool(
        description="Asks for input only through the capabilities the client declared: elicitation, "
        "sampling and roots, whichever it supports."
    )
    async def test_input_required_result_capabilities(ctx: Context) -> Asked:
        inputs = ClientInput(ctx)
        wanted = {
            "user_name": elicitation("What is your name?", NAME_SCHEMA),
            "greeting": sampling("Generate a greeting", 50),
            "client_roots": roots(),
        }
        supported = {key: question for key, question in wanted.items() if inputs.supports(question)}
        if not supported:
            return _text("The client declared none of elicitation, sampling and roots: nothing to ask.")
        answers = await inputs.ask(supported)
        if isinstance(answers, InputRequiredResult):
            return answers
        return _text(f"Answered through the declared capabilities: {', '.join(sorted(answers))}")

    @server.prompt(description="A prompt that first asks the user what context to use (key user_context).")
    async def test_input_required_result_prompt(ctx: Context) -> list[UserMessage] | InputRequiredResult:
        schema = {"type": "object", "properties": {"context": {"type": "string"}}, "required": ["context"]}
        answers = await ClientInput(ctx).ask(
            {"user_context": elicitation("What context should the prompt use?", schema)}
        )
        if isinstance(answers, InputRequiredResult):
            return answers
        answer = _elicited(answers["user_context"])
        context = answer.content["context"] if answer.action == "accept" and answer.content else "none given"
        return [UserMessage(role="user", content=TextContent(type="text", text=f"Use this context: {context}"))]


def _confirmation():
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    return elicitation("Please confirm", schema)


def _text(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)])


def _elicited(answer: BaseModel) -> ElicitResult:
    assert isinstance(answer, ElicitResult)
    return answer


def _outcome(answer: BaseModel) -> str:
    result = _elicited(answer)
    return f"action={result.action}, content={json.dumps(result.content or {}, sort_keys=True)}"


def _sampled_text(answer: BaseModel) -> str:
    assert isinstance(answer, CreateMessageResult)
    content = answer.content
    return content.text if isinstance(content, TextContent) else f"<{content.type} content>"


def _root_list(answer: BaseModel) -> str:
    assert isinstance(answer, ListRootsResult)
    if not answer.roots:
        return "none"
    return ", ".join(f"{root.uri}" + (f" ({root.name})" if root.name else "") for root in answer.roots)
