"""The mcpfleet operator: McpSandbox and McpSandboxPool handlers for kopf (see handlers.py's state table).

A program of its own, deployed beside the gateway; nothing in the gateway imports it.
"""
