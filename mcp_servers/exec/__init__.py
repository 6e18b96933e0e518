"""The `exec` server: shell commands in the workspace, with a time limit and bounded output."""

from mcp_servers.exec.server import create_server

__all__ = ["create_server"]
