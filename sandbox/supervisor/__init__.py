"""The supervisor: the init process of a sandbox.

It runs the sandbox's MCP servers as stdio children and multiplexes them onto
one channel to the gateway (see `sandbox.wire`). Standard library only, so it
starts fast and needs nothing installed inside the sandbox but Python.
"""
