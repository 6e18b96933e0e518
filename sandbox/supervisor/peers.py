"""Who is on the other end of a loopback connection, for the sandbox's local endpoints.

The sandbox's processes share a uid, so a credential in a server's environment is no proof: a
neighbour can read it from /proc/PID/environ. The egress proxy (`proxy`) and the model endpoint
(`models`) therefore also ask the kernel who holds the client end of each connection (the
socket's inode in /proc/net/tcp, then the processes holding it) and serve it only if every
holder is the server's process or one of its descendants. Neighbours cannot become one: ptrace
is limited to a process's own descendants (gVisor's Yama `ptrace_scope` is 1) and a neighbour is
no descendant of the server.
"""

from __future__ import annotations

import os


def stranger(server: str, root: int | None, peer: tuple[str, int] | None, local_port: int) -> str | None:
    """Why the connection from `peer` to our `local_port` is not `server`'s own (None: it is);
    `root` is the server's process id (None while it is not running)."""
    if root is None or peer is None:
        return f"server {server!r} is not running"
    holders = socket_holders(peer[1], local_port)
    if not holders:
        return "cannot tell which process connected"
    for pid in holders:
        if not descends_from(pid, root):
            return f"process {pid} is not server {server!r} or one of its children: these are its credentials"
    return None


def socket_holders(client_port: int, server_port: int) -> set[int]:
    """Processes holding the client end of the loopback connection client_port -> server_port."""
    wanted = (f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}")
    inode = None
    try:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                # An earlier connection of the same ports may linger in TIME_WAIT (Linux reuses
                # loopback ports at once: tcp_tw_reuse), with no inode: the live one has one.
                if len(fields) > 9 and (fields[1], fields[2]) == wanted and fields[9] != "0":
                    inode = fields[9]
                    break
    except OSError:
        return set()
    if inode is None:
        return set()
    link = f"socket:[{inode}]"
    holders = set()
    for pid in filter(str.isdigit, _listdir("/proc")):
        for fd in _listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    holders.add(int(pid))
                    break
            except OSError:
                continue
    return holders


def descends_from(pid: int, root: int) -> bool:
    """Whether `pid` is `root` or below it (parents read from /proc/PID/stat)."""
    for _ in range(64):  # deeper than any server's process tree
        if pid == root:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The name in parentheses may hold spaces and parentheses: the fields follow its last ')'.
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
