"""`python -m mcp_servers.conformance [--transport streamable-http --host H --port P]`"""

from mcp_servers import serve
from mcp_servers.conformance.events import MemoryEventStore
from mcp_servers.conformance.server import create_server


def main() -> None:
    args = serve.parse_args("python -m mcp_servers.conformance", "The MCP conformance suite's fixture server.")
    # Over HTTP, SSE streams can be resumed: the suite closes one mid-call and reconnects.
    serve.run(create_server(), args, event_store=MemoryEventStore(), retry_interval_ms=500)


if __name__ == "__main__":
    main()
