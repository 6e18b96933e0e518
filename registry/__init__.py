"""The tool registry: servers publishers upload, validation, approvals pinning tool definitions, search."""
