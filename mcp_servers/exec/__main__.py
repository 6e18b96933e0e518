"""`python -m mcp_servers.exec [--transport streamable-http --host H --port P]`

Commands run in `MCPFLEET_WORKSPACE_ROOT` (default `/workspace`).
"""

import os

from mcp_servers import serve
from mcp_servers.exec.server import create_server


def main() -> None:
    args = serve.parse_args("python -m mcp_servers.exec", "Shell commands in the workspace, over MCP.")
    serve.run(create_server(os.environ.get("MCPFLEET_WORKSPACE_ROOT", "/workspace")), args)


if __name__ == "__main__":
    main()
