"""A trial run: one server alone in a throwaway gVisor sandbox, its offerings listed, its cost measured.

Validation runs every published version this way (recording the definitions that approvals
pin: tools, prompts, resources, resource templates and the server's instructions, and what
its argument-free prompts and its resources say, for the scan), and `mcpfleet dev` runs a
developer's project the same way. The sandbox is a one-shot one (`sandbox.oneshot`, started
as the manager starts a user's): the standard tier's limits, no network, an empty workspace
that is a tmpfs of the tier's disk quota (the code on trial writes nothing to the host's disk),
all of it destroyed after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sandbox.backends.base import SandboxBackend
from sandbox.client import SupervisorClient
from sandbox.errors import SandboxRpcError, SandboxUnavailable
from sandbox.manager import SANDBOX_GID, SANDBOX_UID
from sandbox.oneshot import one_shot
from sandbox.servers import ServerSpec
from sandbox.tiers import Tier

TRIAL_TIER = Tier("standard", cpus=1, memory_mb=512, pids=256, disk_mb=64)
MAX_SAMPLES = 32
"""Prompts rendered and resources read at most, each: enough for a server's static text."""
MAX_SAMPLE_CHARS = 64 * 1024
SAMPLE_TIMEOUT = 10.0


@dataclass
class TrialResult:
    tools: list[dict[str, Any]] = field(default_factory=list)
    start_ms: int | None = None
    """From starting the sandbox to the server answering `initialize`."""
    memory_bytes: int | None = None
    """The sandbox's memory once the server is up (supervisor and gVisor included)."""
    error: str | None = None
    """Why the server did not start or list its tools; None when it did."""
    call_result: dict[str, Any] | None = None
    server_info: dict[str, Any] | None = None
    offerings: dict[str, Any] = field(default_factory=dict)
    """prompts, resources, resourceTemplates (lists as the server gave them), instructions (its
    `initialize` text or None) and samples: pin key -> the text of a prompt rendered without
    arguments or of a resource read, as the model would get it."""


async def trial_run(
    backend: SandboxBackend,
    home: Path,
    spec: ServerSpec,
    install: Path | None,
    *,
    call: tuple[str, dict[str, Any]] | None = None,
    timeout: float = 120.0,
    uid: int = SANDBOX_UID,
    gid: int = SANDBOX_GID,
    layers: Mapping[str, Path] | None = None,
) -> TrialResult:
    """Run `spec` (whose code is `install`, linked into the sandbox's tools dir under `spec.revision`,
    beside its dependency `layers`: digest -> the layer's dir)."""
    result = TrialResult()
    tools = {spec.revision: install} if install is not None else {}
    tools.update(layers or {})
    try:
        async with one_shot(
            backend, home, [spec], tools,
            limits=TRIAL_TIER.limits, workspace_bytes=TRIAL_TIER.disk_bytes, uid=uid, gid=gid, timeout=timeout,
        ) as sandbox:  # fmt: skip
            result.start_ms = round(sandbox.start_s * 1e3)
            result.memory_bytes = await backend.memory_bytes(sandbox.id)
            await _inspect(sandbox.client, spec, result, call, timeout)
    except (SandboxUnavailable, OSError, asyncio.TimeoutError) as exc:
        result.error = f"the sandbox did not start: {exc}"
    return result


class PodTrials(Protocol):
    """Throwaway sandboxes another system runs (`sandbox.kubernetes_trials.KubernetesTrials`)."""

    def one_shot(self, spec: ServerSpec, tier: Tier, timeout: float) -> AbstractAsyncContextManager[tuple[SupervisorClient, float]]:
        """A sandbox running `spec` alone: its client and the seconds it took to answer."""
        ...


async def trial_in_pod(
    pods: PodTrials, spec: ServerSpec, *, call: tuple[str, dict[str, Any]] | None = None, timeout: float = 120.0
) -> TrialResult:
    """`trial_run` on the kubernetes backend: the same look at the server, in a throwaway pod the
    operator runs (gVisor, the trial tier, no egress), which fetches the wheel itself. Its memory is
    not measured (the pod's is the kubelet's to report); `start_ms` includes scheduling the pod."""
    result = TrialResult()
    try:
        async with pods.one_shot(spec, TRIAL_TIER, timeout) as (client, start_s):
            result.start_ms = round(start_s * 1e3)
            await _inspect(client, spec, result, call, timeout)
    except (SandboxUnavailable, OSError, asyncio.TimeoutError) as exc:
        result.error = f"the sandbox did not start: {exc}"
    return result


async def _inspect(
    client: SupervisorClient, spec: ServerSpec, result: TrialResult, call: tuple[str, dict[str, Any]] | None, timeout: float
) -> None:
    """What the server offers, and what it answers to `call`, into `result`."""
    entry = (await client.catalog()).get(spec.name) or {}
    if entry.get("state") != "ready":
        result.error = f"the server did not start: {entry.get('error') or 'no reason given'}"
        return
    if entry.get("error"):
        result.error = entry["error"]
    result.tools = list(entry.get("tools") or [])
    result.server_info = entry.get("serverInfo")
    result.offerings = {key: list(entry.get(key) or []) for key in ("prompts", "resources", "resourceTemplates")}
    result.offerings["instructions"] = entry.get("instructions") or None
    result.offerings["samples"] = await _samples(client, spec.name, result.offerings, timeout)
    if call is not None:
        name, arguments = call
        try:
            result.call_result = await client.request(
                spec.name, "tools/call", {"name": name, "arguments": arguments}, timeout=timeout
            )
        except SandboxRpcError as exc:
            result.call_result = {"isError": True, "error": {"code": exc.code, "message": exc.message}}


async def _samples(client: SupervisorClient, server: str, offerings: dict[str, Any], timeout: float) -> dict[str, str]:
    """The text of each prompt that needs no argument, and of each listed resource: a prompt's
    description may be harmless while the messages it renders are not."""
    samples: dict[str, str] = {}
    requests = [
        (f"prompt:{p['name']}", "prompts/get", {"name": p["name"], "arguments": {}})
        for p in offerings["prompts"][:MAX_SAMPLES]
        if isinstance(p.get("name"), str) and not any(a.get("required") for a in p.get("arguments") or [] if isinstance(a, dict))
    ] + [
        (f"resource:{r['uri']}", "resources/read", {"uri": r["uri"]})
        for r in offerings["resources"][:MAX_SAMPLES]
        if isinstance(r.get("uri"), str)
    ]
    for key, method, params in requests:
        try:
            answer = await client.request(server, method, params, timeout=min(timeout, SAMPLE_TIMEOUT))
        except (SandboxRpcError, TimeoutError, asyncio.TimeoutError):
            continue  # a prompt or resource that cannot be had without more context is judged by its definition
        samples[key] = "\n".join(_strings(answer.get("messages") or answer.get("contents") or []))[:MAX_SAMPLE_CHARS]
    return samples


def _strings(value: Any) -> list[str]:
    """Every `text` of a prompt's messages or a resource's contents (not blobs, URIs or types)."""
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in ([item] if key == "text" and isinstance(item, str) else _strings(item))]
    return []


def trial_check(trial: TrialResult, memory_mb: int | None, ran: bool) -> dict[str, Any]:
    """Validation's `trial` check; `memory_mb`: what the manifest declares the server needs at most."""
    if not ran:
        return {"check": "trial", "ok": False, "detail": "not run: the package or dependencies check failed", "findings": []}
    if trial.error is not None:
        return {"check": "trial", "ok": False, "detail": trial.error, "findings": []}
    if not trial.tools:
        return {"check": "trial", "ok": False, "detail": "the server lists no tools", "findings": []}
    detail = f"{len(trial.tools)} tool(s); started in {trial.start_ms} ms"
    if trial.memory_bytes is not None:
        detail += f"; sandbox memory {trial.memory_bytes / 2**20:.0f} MiB"
    limit = memory_mb
    if limit is not None and trial.memory_bytes is not None and trial.memory_bytes > limit * 2**20:
        return {"check": "trial", "ok": False, "detail": detail + f", over the {limit} MiB it declares", "findings": []}
    return {"check": "trial", "ok": True, "detail": detail, "findings": []}
