"""Fixture prompts: plain, with arguments, with an embedded resource, with an image."""

from __future__ import annotations

from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer, UserMessage
from mcp_types import EmbeddedResource, ImageContent, TextContent, TextResourceContents
from pydantic import Field

from mcp_servers.conformance.media import PNG_BASE64


def register(server: MCPServer[Any]) -> None:
    @server.prompt(description="A simple prompt without arguments")
    def test_simple_prompt() -> list[UserMessage]:
        return [_user(TextContent(type="text", text="This is a simple prompt for testing."))]

    @server.prompt(description="A prompt with two required arguments")
    def test_prompt_with_arguments(
        arg1: Annotated[str, Field(description="First test argument")],
        arg2: Annotated[str, Field(description="Second test argument")],
    ) -> list[UserMessage]:
        return [_user(TextContent(type="text", text=f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]

    @server.prompt(description="A prompt that embeds the resource it is given")
    def test_prompt_with_embedded_resource(
        resourceUri: Annotated[str, Field(description="URI of the resource to embed")],  # noqa: N803
    ) -> list[UserMessage]:
        return [
            _user(
                EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
                    ),
                )
            ),
            _user(TextContent(type="text", text="Please process the embedded resource above.")),
        ]

    @server.prompt(description="A prompt with an image")
    def test_prompt_with_image() -> list[UserMessage]:
        return [
            _user(ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")),
            _user(TextContent(type="text", text="Please analyze the image above.")),
        ]


def _user(content: TextContent | ImageContent | EmbeddedResource) -> UserMessage:
    return UserMessage(role="user", content=content)
