"""Fixture tools that answer on their own: content types, errors, logging, progress, streams, schemas."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import (
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)
from pydantic import Field

from mcp_servers.conformance.logs import SessionLogLevels
from mcp_servers.conformance.media import PNG_BASE64, WAV_BASE64

# The input schema `json-schema-2020-12` looks for, keyword for keyword.
JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"
CONTACT_SCHEMA: dict[str, Any] = {
    "$schema": JSON_SCHEMA_2020_12,
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


def register(server: MCPServer[Any], logs: SessionLogLevels) -> None:
    @server.tool(description="Returns a single text block.", structured_output=False)
    def test_simple_text() -> str:
        return "This is a simple text response for testing."

    @server.tool(description="Returns an image block: a 1x1 red PNG.")
    def test_image_content() -> list[ImageContent]:
        return [ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")]

    @server.tool(description="Returns an audio block: 10 ms of silence as WAV.")
    def test_audio_content() -> list[AudioContent]:
        return [AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav")]

    @server.tool(description="Returns an embedded text resource.")
    def test_embedded_resource() -> list[EmbeddedResource]:
        return [
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
                ),
            )
        ]

    @server.tool(description="Returns a text, an image and an embedded resource block, in that order.")
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        return [
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG_BASE64, mime_type="image/png"),
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://mixed-content-resource",
                    mime_type="application/json",
                    text=json.dumps({"test": "data", "value": 123}, separators=(",", ":")),
                ),
            ),
        ]

    @server.tool(description="Always fails: returns an error result.")
    def test_error_handling() -> CallToolResult:
        return CallToolResult(
            content=[TextContent(type="text", text="This tool intentionally returns an error for testing")],
            is_error=True,
        )

    @server.tool(description="Sends three info log messages about 50 ms apart while it runs.", structured_output=False)
    async def test_tool_with_logging(ctx: Context) -> str:
        await logs.log(ctx, "info", "Tool execution started")
        await anyio.sleep(0.05)
        await logs.log(ctx, "info", "Tool processing data")
        await anyio.sleep(0.05)
        await logs.log(ctx, "info", "Tool execution completed")
        return "Tool with logging executed successfully"

    @server.tool(
        description="Reports progress 0, 50 and 100 of 100, about 50 ms apart, when the call carries a progress token.",
        structured_output=False,
    )
    async def test_tool_with_progress(ctx: Context) -> str:
        for step in (0, 50, 100):
            if step:
                await anyio.sleep(0.05)
            await ctx.report_progress(step, 100, f"Completed step {step} of 100")
        return "Progress reported: 0, 50 and 100 of 100"

    @server.tool(
        description=(
            "Closes the response's SSE stream in the middle of the call, then finishes; a client that resumes "
            "the stream with Last-Event-ID receives the result."
        ),
        structured_output=False,
    )
    async def test_reconnection(ctx: Context) -> str:
        await logs.log(ctx, "info", "Before disconnect")
        await ctx.close_sse_stream()
        await anyio.sleep(0.2)
        await logs.log(ctx, "info", "After reconnect")
        return "Reconnection test completed"

    @server.tool(
        description="Echoes its region argument, which clients also send as the Mcp-Param-Region header "
        "(SEP-2243); a request whose header and argument disagree is refused.",
        structured_output=False,
    )
    def test_custom_headers(
        region: Annotated[
            str, Field(description="Region name, mirrored into a header", json_schema_extra={"x-mcp-header": "Region"})
        ],
    ) -> str:
        return f"Region: {region}"

    @server.tool(
        description="Sends info log messages; on 2026-07-28 only when the request opted in to logging.",
        structured_output=False,
    )
    async def test_logging_tool(ctx: Context) -> str:
        for n in (1, 2, 3):
            await logs.log(ctx, "info", f"Log message {n} of 3")
        return "Sent 3 log messages"


def contact_tool() -> Tool:
    """`json_schema_2020_12_tool`, whose input schema is the JSON Schema 2020-12 document above, unchanged.

    Built here rather than with the decorator, which would derive the schema from the signature.
    """

    def json_schema_2020_12_tool(
        name: str | None = None,
        address: dict[str, Any] | None = None,
        contactMethod: Literal["phone", "email"] | None = None,  # noqa: N803 - the schema's own name
        phone: str | None = None,
        email: str | None = None,
    ) -> str:
        import jsonschema  # only this tool needs it

        given = {
            key: value
            for key, value in {
                "name": name,
                "address": address,
                "contactMethod": contactMethod,
                "phone": phone,
                "email": email,
            }.items()
            if value is not None
        }
        try:
            jsonschema.Draft202012Validator(CONTACT_SCHEMA).validate(given)
        except jsonschema.ValidationError as exc:
            raise ToolError(f"arguments do not match the input schema: {exc.message}") from None
        return f"Contact accepted: {json.dumps(given, sort_keys=True)}"

    tool = Tool.from_function(
        json_schema_2020_12_tool,
        description="Tool with JSON Schema 2020-12 features",
        structured_output=False,
    )
    return tool.model_copy(update={"parameters": CONTACT_SCHEMA})
