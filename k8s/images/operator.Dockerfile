# The kopf operator (`mcpfleet-operator`), on the same locally made base as the gateway.
ARG BASE=mcpfleet-base:local
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/mcpfleet/bin:/usr/bin:/bin
COPY . /src
RUN python3 -m venv /opt/mcpfleet \
 && /opt/mcpfleet/bin/pip install --no-cache-dir --disable-pip-version-check '/src[operator]' \
 && rm -rf /src
USER 10001:10001
CMD ["mcpfleet-operator"]
