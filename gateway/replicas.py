"""`mcpfleet up --replicas N`: N gateway processes behind one port.

Each replica binds the port with `SO_REUSEPORT` (the kernel spreads new connections over them) and a
loopback port of its own, which it names when it holds the sandbox lock: that is where the others
pass `/mcp` on to (gateway/forward.py, sandbox/lease.py). The parent starts the database (the
embedded one, if no `DATABASE_URL`) and the schema once, hands the URL to the replicas, starts again
a replica that dies (a death costs the calls it held), and stops them all on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from core.settings import Settings
from gateway.forward import SECRET_ENV

log = logging.getLogger("mcpfleet")

REPLICA_ENV = "MCPFLEET_REPLICA"
RESTART_AFTER_S = 1.0


def replica_sockets(settings: Settings) -> tuple[list[socket.socket], str]:
    """The shared port (SO_REUSEPORT) and this replica's own loopback port, and the latter's address."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    shared = socket.socket(family, socket.SOCK_STREAM)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    shared.bind((settings.host, settings.port))
    own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    own.bind(("127.0.0.1", 0))
    for s in (shared, own):
        s.listen(2048)
        s.set_inheritable(True)
    return [shared, own], f"127.0.0.1:{own.getsockname()[1]}"


def run_replicas(settings: Settings, database_url: str, count: int) -> int:
    """Run `count` replicas until told to stop; 0 on an orderly stop."""
    env = {**os.environ, "DATABASE_URL": database_url, "MCPFLEET_HOST": settings.host, "MCPFLEET_PORT": str(settings.port),
           # New each run: what a replica that passes a request on says of its client is trusted with it alone.
           SECRET_ENV: secrets.token_urlsafe(32)}
    command = [sys.executable, "-m", "cli", "up"]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: dict[int, subprocess.Popen[bytes]] = {}
    for index in range(count):
        children[index] = subprocess.Popen(command, env={**env, REPLICA_ENV: str(index)})
    log.info("%d replicas on %s:%d: pids %s", count, settings.host, settings.port, ", ".join(str(c.pid) for c in children.values()))
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            if child.poll() is not None and not stopping:
                log.warning("replica %d (pid %d) exited with %s; starting it again", index, child.pid, child.returncode)
                time.sleep(RESTART_AFTER_S)
                children[index] = subprocess.Popen(command, env={**env, REPLICA_ENV: str(index)})
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0
