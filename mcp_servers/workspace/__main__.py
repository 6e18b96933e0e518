"""`python -m mcp_servers.workspace [--transport streamable-http --host H --port P]`

The root is `MCPFLEET_WORKSPACE_ROOT` (default `/workspace`).
"""

import os

from mcp_servers import serve
from mcp_servers.workspace.server import create_server


def main() -> None:
    args = serve.parse_args("python -m mcp_servers.workspace", "Files of the workspace, over MCP.")
    serve.run(create_server(os.environ.get("MCPFLEET_WORKSPACE_ROOT", "/workspace")), args)


if __name__ == "__main__":
    main()
