"""What a fresh sandbox's memory is made of, for `sandbox_lifecycle.py`: the PSS of its runsc processes
on this host, in all and by process (sentry, gofer, systrap stubs), and the RSS of each process
inside it as gVisor reports it (read with `runsc exec` of a shell)."""

from __future__ import annotations

from pathlib import Path

from lifecycle_report import MiB, Samples  # beside this script

from sandbox.backends.runsc import RunscBackend, descendant_pids
from sandbox.manager import Sandbox, SandboxManager
from sandbox.memory import pss_bytes


def sandbox_pids(backend: RunscBackend, sandbox_id: str) -> set[int]:
    """The processes `RunscBackend.memory_bytes` sums (sentry, gofer, platform stubs): PSS needs the same set."""
    pids = backend.host_processes(sandbox_id)
    return set(pids + [child for pid in pids for child in descendant_pids(pid)])



async def fresh_memory(manager: SandboxManager, sandbox: Sandbox, samples: Samples) -> None:
    """The PSS of a sandbox's runsc processes, in all and by process, and the RSS of each process
    inside it (`runsc exec` of a shell reading /proc, which gVisor serves from its own accounting)."""
    backend = manager.backend
    assert isinstance(backend, RunscBackend)
    pids = sandbox_pids(backend, sandbox.id)
    samples.fresh_pss_mib.append(pss_bytes(pids) / MiB)
    samples.fresh_own_mib.append(own_pss_bytes(pids) / MiB)
    parts: dict[str, float] = {}
    for pid in pids:
        parts[f"host: {runsc_role(pid)}"] = parts.get(f"host: {runsc_role(pid)}", 0.0) + pss_bytes([pid]) / MiB
    code, out = await backend.run_inside(sandbox.id, INSIDE_RSS)
    if code != 0:
        print(f"(the processes inside could not be read: runsc exec exited {code}: {out.strip()[-300:]})")
    for line in out.splitlines() if code == 0 else []:
        pid, _, rest = line.partition(" ")
        cmdline, _, pages = rest.rpartition(" ")
        if pid.isdigit() and pages.isdigit() and not cmdline.startswith(("/bin/sh", "tr ", "cut ")):  # not the reader
            key = f"inside: {inside_role(int(pid), cmdline)} (RSS)"
            parts[key] = parts.get(key, 0.0) + int(pages) * 4096 / MiB
    for name, mib in parts.items():
        samples.fresh_parts.setdefault(name, []).append(mib)


def own_pss_bytes(pids: set[int]) -> int:
    """The PSS of what only this sandbox holds: its processes' anonymous mappings and the sentry's
    memory files (`memfd:`), shared among its own processes only. The rest of its PSS is host files
    (the runsc binary, the Python and its libraries inside), whose pages every process mapping them
    shares: their part of a sandbox's PSS falls as more sandboxes (or anything else) run, so the
    total swings by 20 MiB with the host's load, while this part does not."""
    total = 0
    for pid in pids:
        try:
            smaps = Path(f"/proc/{pid}/smaps").read_text()
        except OSError:
            continue
        host_file = False
        for line in smaps.splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
                path = fields[5] if len(fields) > 5 else ""
                host_file = path.startswith("/") and not path.startswith("/memfd:")
            elif fields and fields[0] == "Pss:" and not host_file:
                total += int(fields[1]) * 1024
    return total


INSIDE_RSS = "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' < $p/cmdline | cut -c1-60) $(cut -d' ' -f2 $p/statm)\"; done"
"""Per process inside the sandbox: its pid, command line (60 characters) and resident pages (`statm`)."""


def inside_role(pid: int, cmdline: str) -> str:
    if pid == 1 and "tini" in cmdline.split(" ", 1)[0]:
        return "init (PID 1: tini, reaps orphans)"
    if pid == 1:
        return "init (PID 1: a fork of the supervisor's Python that reaps orphans)"
    if "sandbox.supervisor.zygote" in cmdline:
        return "fork server"
    if "sandbox.supervisor" in cmdline:
        return "supervisor"
    return cmdline.split(" -m ")[-1].split()[0] if " -m " in cmdline else cmdline.split()[0]


def runsc_role(pid: int) -> str:
    """What a runsc process of a sandbox is, from its argv: the sentry (`boot`), the gofer, or a stub."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"boot" in argv:
        return "runsc sandbox (sentry: all memory of the processes inside)"
    if b"gofer" in argv:
        return "runsc gofer"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = "?"
    if not any(argv) and comm == "exe":
        return "systrap stubs (the address spaces of the processes inside, mapped from the sentry's memory file)"
    return f"other runsc process ({comm}: {b' '.join(argv[:3]).decode(errors='replace')[:60]})"
