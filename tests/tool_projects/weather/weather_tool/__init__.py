"""A small MCP server for the SDK's and the registry's tests: weather made up from the city's name."""
