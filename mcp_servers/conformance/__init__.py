"""The fixture server of the MCP conformance suite, run like any other server in a sandbox."""

from mcp_servers.conformance.server import create_server

__all__ = ["create_server"]
