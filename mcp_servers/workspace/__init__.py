"""The `workspace` server: the user's files, confined to the workspace root."""

from mcp_servers.workspace.server import create_server

__all__ = ["create_server"]
