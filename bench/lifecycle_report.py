"""The tables `sandbox_lifecycle.py` prints: its samples, one row per measure, the density
extrapolations, and the side-by-side of the gVisors measured in one run."""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.gvisor import Gvisor

MiB = 2**20


@dataclass
class Samples:
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)
    baseline_ms: list[float] = field(default_factory=list)
    hibernate_ms: list[float] = field(default_factory=list)
    resume_ms: list[float] = field(default_factory=list)
    woken_ms: list[float] = field(default_factory=list)
    checkpoint_mib: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    pss_mib: list[float] = field(default_factory=list)
    fresh_pss_mib: list[float] = field(default_factory=list)
    fresh_own_mib: list[float] = field(default_factory=list)
    first_call_ms: list[float] = field(default_factory=list)
    fresh_parts: dict[str, list[float]] = field(default_factory=dict)
    """A fresh idle sandbox's memory by process: the host's runsc processes (PSS) and, inside, each process's RSS."""
    seal_ms: list[float] = field(default_factory=list)
    unseal_ms: list[float] = field(default_factory=list)
    runsc_run_ms: list[float] = field(default_factory=list)
    last_runsc_run: tuple[float, float] = (0.0, 0.0)
    """The last `runsc run`'s milliseconds and the wall clock when it returned."""
    ensure_ms: list[float] = field(default_factory=list)
    supervisor_up_ms: list[float] = field(default_factory=list)
    servers_ready_ms: dict[str, list[float]] = field(default_factory=dict)
    warm_misses: int = 0
    """Claims that started cold after all (the pooled sandbox was not the one handed out)."""
    resume_phases: dict[str, list[float]] = field(default_factory=dict)
    """Where each resume's time went: `Steps.resume`'s phases, the rest of `manager.ensure`, the call."""

    def add_resume_phases(self, phases: dict[str, float], ensure_ms: float, call_ms: float) -> None:
        for name, ms in phases.items():
            self.resume_phases.setdefault(name, []).append(ms)
        rest = ensure_ms - sum(phases.values())
        self.resume_phases.setdefault("rest of ensure (lock, row read, configure)", []).append(rest)
        self.resume_phases.setdefault("first tool call", []).append(call_ms)


@dataclass
class Config:
    gvisor: Gvisor
    sealed: bool = False
    """Checkpoint images sealed with data keys from the bench's embedded OpenBao."""
    fork_server: bool = True
    """The built-in servers forked from the sandbox's fork server (`MCPFLEET_FORK_SERVER`), else each executed."""
    quick: bool = True
    """The quick restore and resume (`RunscBackend.quick_restore`, `SandboxManager(quick_resume=)`)."""
    wake: bool = True
    """Also measure a resume woken by the client's handshake (`SandboxManager.wake`)."""
    start_servers: str = "first-use"
    """When the sandbox's servers start (`MCPFLEET_START_SERVERS`): on first use, or all at boot (the baseline)."""


@dataclass
class Density:
    asked: int
    running: int = 0
    failed: list[str] = field(default_factory=list)
    rss_bytes: int = 0
    pss_bytes: int = 0
    available_before: int = 0
    available_after: int = 0
    hibernated: int = 0
    checkpoint_disk_bytes: int = 0


# -- measuring ---------------------------------------------------------------------------------


def mem_info(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)



# -- the report ---------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def row(
    name: str,
    values: list[float],
    unit: str,
    target: str,
    baseline: float | None = None,
) -> str:
    if not values:
        return f"| {name} | – | – | 0 | {target} | |"
    median = statistics.median(values)
    ratio = f"{median / baseline:.1f}×" if baseline else ""
    return f"| {name} | {median:,.1f} {unit} | {p99(values):,.1f} {unit} | {len(values)} | {target} | {ratio} |"


MEASURES: list[tuple[str, str, str, str, bool]] = [
    # (Samples field, what, unit, target, read against the baseline call)
    ("baseline_ms", "baseline: first tool call on a running sandbox", "ms", "", True),
    ("cold_ms", "cold start → first tool result (new user, pool empty; `ensure` + first call)", "ms", "≤ 500 ms", True),
    ("first_call_ms", "first tool call on a fresh sandbox (after `ensure` and an idle pause)", "ms", "", True),
    ("warm_ms", "warm-pool claim → first tool result (pool of 1)", "ms", "≤ 100 ms", True),
    ("hibernate_ms", "hibernate (`manager.hibernate`)", "ms", "", False),
    ("resume_ms", "resume → first tool result", "ms", "≤ 300 ms", True),
    ("woken_ms", "resume woken at the handshake, call 200 ms later → its result", "ms", "≤ 300 ms", True),
    ("checkpoint_mib", "checkpoint size (row `checkpoint_bytes`)", "MiB", "", False),
    ("seal_ms", "seal of the image (part of hibernate)", "ms", "", False),
    ("unseal_ms", "unseal of the image (part of resume)", "ms", "", False),
    ("rss_mib", "idle running sandbox, RSS sum of its runsc processes", "MiB", "≤ 40 MB (38.1 MiB)", False),
    ("pss_mib", "idle running sandbox, PSS of the same processes", "MiB", "≤ 40 MB (38.1 MiB)", False),
    ("fresh_pss_mib", "fresh sandbox idle before its first call, PSS", "MiB", "≤ 40 MB (38.1 MiB)", False),
    ("fresh_own_mib", "the same, its own memory only (PSS of anonymous and memfd mappings: no host file)", "MiB", "", False),
]


def cold_parts(samples: Samples, console: str) -> None:
    """What the supervisor's log (the sandbox's console.log) says of its cold start: how long after the
    `runsc run` returned it was up, and each server's start to its answer to `initialize`."""
    took, returned_at = samples.last_runsc_run
    samples.runsc_run_ms.append(took)
    for line in console.splitlines():
        if line.startswith("supervisor: up at "):
            samples.supervisor_up_ms.append((float(line.split()[3]) - returned_at) * 1e3)
        elif line.startswith("supervisor: server ") and " ready in " in line:
            words = line.split()
            samples.servers_ready_ms.setdefault(f"{words[2]} ({words[-1].strip('()')})", []).append(float(words[5]))


def report_parts(samples: Samples) -> None:
    print("\n### Where a cold start goes (medians of the cold starts above)\n")
    print("| part | median | p99 | n |")
    print("|---|---|---|---|")
    parts = [
        ("`manager.ensure` (prepare: database, workspace image, bundle; runsc run; supervisor hello)", samples.ensure_ms),
        ("of which `runsc run --detach` (create and start of the sandbox)", samples.runsc_run_ms),
        ("of which the supervisor up after `runsc run` returned (Python start, its imports)", samples.supervisor_up_ms),
        *((f"of which server {name}: start → `initialize` answered", values)
          for name, values in sorted(samples.servers_ready_ms.items())),
        ("first tool result after `ensure` returned", [c - e for c, e in zip(samples.cold_ms, samples.ensure_ms)]),
    ]
    for what, values in parts:
        if values:
            print(f"| {what} | {statistics.median(values):,.0f} ms | {p99(values):,.0f} ms | {len(values)} |")


def report(samples: Samples, dense: Density | None, home: Path) -> None:
    base = statistics.median(samples.baseline_ms) if samples.baseline_ms else None
    print("| measure | median | p99 | n | target | × baseline |")
    print("|---|---|---|---|---|---|")
    for key, what, unit, target, against_baseline in MEASURES:
        print(row(what, getattr(samples, key), unit, target, base if against_baseline else None))
    if samples.resume_phases:
        print("\nWhere a resume's time goes (`Steps.resume` phases, then the rest of `manager.ensure` and the call):\n")
        print("| phase | median | p99 | n |")
        print("|---|---|---|---|")
        for name, values in samples.resume_phases.items():
            print(f"| {name} | {statistics.median(values):,.1f} ms | {p99(values):,.1f} ms | {len(values)} |")
    if samples.fresh_parts:
        print("\nWhat a fresh idle sandbox's memory is made of (before its first call): the host's runsc processes "
              "by PSS (the sentry's holds all memory of the processes inside), and inside it each process's RSS "
              "as gVisor reports it (pages shared by a fork are counted in each):\n")
        print("| part | median | p99 | n |")
        print("|---|---|---|---|")
        for name, values in sorted(samples.fresh_parts.items()):
            print(f"| {name} | {statistics.median(values):,.1f} MiB | {p99(values):,.1f} MiB | {len(values)} |")
    if samples.warm_misses:
        print(
            f"\n{samples.warm_misses} of {len(samples.warm_ms)} warm claims started cold after all."
        )
    print(
        "\nPSS is the better figure for an idle sandbox: RSS counts every page each process maps, so pages shared "
        "between the sentry, the gofer and the stubs (the runsc binary, shared memory) count once per process; "
        "PSS splits a shared page among its sharers, so the sum counts it once."
    )
    if dense is None:
        return
    n = dense.running
    total, free_disk = mem_info("MemTotal"), shutil.disk_usage(home).free
    pss_each = dense.pss_bytes / n if n else 0
    rss_each = dense.rss_bytes / n if n else 0
    drop_each = (dense.available_before - dense.available_after) / n if n else 0
    disk_each = (
        dense.checkpoint_disk_bytes / dense.hibernated if dense.hibernated else 0
    )
    print(f"\n### Density ({dense.asked} started one after another)\n")
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| running at once | {n} of {dense.asked} | |")
    print(
        f"| total RSS / PSS of the running ones | {dense.rss_bytes / MiB:,.0f} / {dense.pss_bytes / MiB:,.0f} MiB "
        f"({rss_each / MiB:.1f} / {pss_each / MiB:.1f} MiB each) | |"
    )
    print(
        f"| host MemAvailable before → after | {dense.available_before / MiB:,.0f} → "
        f"{dense.available_after / MiB:,.0f} MiB (drop {drop_each / MiB:,.1f} MiB per sandbox; "
        "shared host, so noisy) | |"
    )
    print(
        f"| checkpoints on disk after hibernating them all | {dense.checkpoint_disk_bytes / MiB:,.0f} MiB for "
        f"{dense.hibernated} ({disk_each / MiB:.1f} MiB each, allocated blocks) | |"
    )
    if pss_each:
        print(
            f"| **extrapolated**: running in {total / 2**30:.1f} GiB of memory, by PSS | "
            f"≈ {total / pss_each:,.0f} | 100 running |"
        )
    if drop_each > 0:
        print(
            f"| **extrapolated**: running in {total / 2**30:.1f} GiB, by MemAvailable drop | "
            f"≈ {total / drop_each:,.0f} | 100 running |"
        )
    if disk_each:
        print(
            f"| **extrapolated**: hibernated in the {free_disk / 2**30:,.0f} GiB free on {home}'s disk | "
            f"≈ {free_disk / disk_each:,.0f} | 1,000 hibernated |"
        )
    print(
        "\nExtrapolations divide the machine's memory (or free disk) by the per-sandbox figure measured above; "
        "they ignore the gateway, PostgreSQL and the page cache, and were not run."
    )
    for failure in dense.failed:
        print(f"- failed to start: {failure}")


def compare(results: list[tuple[Config, Samples]]) -> None:
    """One row per measure, one column per configuration (median / p99), and each one's median over the first's."""
    first = results[0][0]
    names = [f"{label(c)}" for c, _ in results]
    print(f"\n## Side by side (ratio: median over {label(first)}'s)\n")
    print("| measure | " + " | ".join(f"{n} median / p99" for n in names) + " | " + " | ".join(f"{n} ×" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(results) - 1))
    for key, what, unit, _, _ in MEASURES:
        cells, medians = [], []
        for _, samples in results:
            values = getattr(samples, key)
            medians.append(statistics.median(values) if values else None)
            cells.append(f"{medians[-1]:,.1f} / {p99(values):,.1f} {unit}" if values else "–")
        ratios = [f"{m / medians[0]:.2f}×" if m is not None and medians[0] else "–" for m in medians[1:]]
        print(f"| {what} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def label(config: Config) -> str:
    gvisor = config.gvisor
    return (f"runsc {gvisor.release or '?'} {gvisor.platform}" + (" uncompressed" if gvisor.uncompressed_checkpoints else "")
            + (" sealed" if config.sealed else "") + ("" if config.fork_server else " executed")
            + ("" if config.quick else " before") + (" boot-start" if config.start_servers == "boot" else ""))


