# The gateway: `mcpfleet up` with the kubernetes sandbox backend. Built by scripts/k8s-images.sh from the
# repository root, on a base made locally (no registry needed): see that script.
ARG BASE=mcpfleet-base:local
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/mcpfleet/bin:/usr/bin:/bin
COPY pyproject.toml /src/
COPY cli /src/cli
COPY core /src/core
COPY gateway /src/gateway
COPY registry /src/registry
COPY sandbox /src/sandbox
COPY mcp_servers /src/mcp_servers
COPY mcpfleet_sdk /src/mcpfleet_sdk
COPY migrations /src/migrations
# Not editable: the image keeps no build tree. Tool search's local embedding model (several hundred MB
# with torch) is left out; the gateway then uses whichever embeddings its settings name.
RUN python3 -m venv /opt/mcpfleet \
 && /opt/mcpfleet/bin/pip install --no-cache-dir --disable-pip-version-check '/src[redis,s3,kubernetes,telemetry]' \
 && cp -r /src/migrations /opt/mcpfleet/migrations && rm -rf /src
USER 10001:10001
WORKDIR /var/lib/mcpfleet
EXPOSE 8080
CMD ["mcpfleet", "up"]
