"""The key that signs admin session cookies.

`MCPFLEET_SESSION_SECRET` when set (several gateway replicas must share one);
otherwise a random key made once and kept in the fleet home, readable by its
owner only, so sessions outlive a restart of a single gateway.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MCPFLEET_SESSION_SECRET"
FILE_NAME = "session-secret"
MIN_LENGTH = 32


def session_secret(home: Path, environ: dict[str, str] | None = None) -> bytes:
    configured = (os.environ if environ is None else environ).get(ENV)
    if configured:
        if len(configured) < MIN_LENGTH:
            raise SystemExit(f"{ENV} must be at least {MIN_LENGTH} characters long")
        return configured.encode()
    return _persisted(home / FILE_NAME)


def _persisted(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written aside, then linked into place: a gateway starting at the same moment sees
        # either no file or a whole one, and only one of the two secrets wins.
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o): made it 0600", path, mode)
        path.chmod(0o600)
    value = path.read_text().strip()
    if len(value) < MIN_LENGTH:
        raise SystemExit(f"{path} holds no usable session secret: delete it to have a new one made")
    return value.encode()
