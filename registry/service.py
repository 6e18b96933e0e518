"""The registry as the gateway runs it: publish and validate, what each user may run, the rug-pull guard.

It is the sandbox manager's server source: a user's sandbox runs exactly the server versions
approved for the user (their tenant's approvals, or their groups'). What a user may run is
cached and refreshed on every NOTIFY registry_changed (approvals, revocations, accepted drift,
group changes), after which `on_change` listeners hear which users' sets changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from psycopg_pool import AsyncConnectionPool

from core.accounts import Identity
from core.db import follow_notifications
from core.outage import OUTAGE_S, UNREACHABLE, DatabaseUnavailable
from core.tasks import Tasks
from core.version import product_version
from registry import store
from registry.artifacts import (
    ArtifactError,
    ArtifactStore,
    S3Artifacts,
    server_spec,
    verify_wheel,
    wheel_metadata,
)
from registry.builtins import builtin_tools
from registry.dependencies import dependency_check, layer_digest
from registry.manifest import Manifest, ManifestError, parse_manifest
from registry.offers import guarded_offer
from registry.onboard_npm import npm_packages_check
from registry.review import ModelReview
from registry.scan_code import code_checks
from registry.store import Approved, RegistryError
from registry.trial import PodTrials, TrialResult, trial_check, trial_in_pod, trial_run
from sandbox.backends.base import SandboxBackend
from sandbox.runtime import PythonRuntime
from sandbox.servers import BUILTIN_SERVERS, FIXTURE_SERVERS, PRODUCT_SERVERS, ServerSpec

log = logging.getLogger(__name__)

BUILTIN_NAMESPACE = "io.mcpfleet"
MAX_WHEEL_BYTES = 50 * 1024 * 1024
DRIFTS_PER_SANDBOX = 5
"""Distinct drifted definitions of one version that one user's sandbox can have recorded: code in
a sandbox can make its servers list anything, and must not fill the registry or the audit log."""


def builtin_entries(*, fixtures: bool = False) -> list[tuple[str, str, str]]:
    """(registry name, prefix, version) of each built-in server; the test fixtures (the conformance
    server) only with `fixtures`."""
    return [
        (f"{BUILTIN_NAMESPACE}/{spec.name}", spec.name, product_version())
        for spec in BUILTIN_SERVERS
        if fixtures or spec.name not in FIXTURE_SERVERS
    ]


ChangeListener = Callable[[set[int]], Awaitable[None]]


class Registry:
    def __init__(
        self,
        home: Path,
        pool: AsyncConnectionPool,
        backend: SandboxBackend | None,
        python: PythonRuntime,
        *,
        no_trial_reason: str = "no sandbox backend to run it in",
        pods: PodTrials | None = None,
        # (prefix, tools, other servers' tools, offerings=...) -> findings: `registry.scan.scan_tools`
        scan: Callable[..., list[Any]] | None = None,
        indexer: Callable[[int, str, list[dict[str, Any]]], Awaitable[None]] | None = None,
        artifacts_s3_url: str | None = None,
        conformance_everywhere: bool = False,
        outage_s: float = OUTAGE_S,
        review: ModelReview | None = None,
    ):
        self.home = Path(home)
        self.outage_s = outage_s
        """How long what users may run stays cached while the database cannot be reached."""
        self.pool = pool
        self.backend = backend
        """Where validation's trial runs; None: no trial, and a version fails validation with
        `no_trial_reason` (an admin may still approve it with --override)."""
        self.no_trial_reason = no_trial_reason
        self.pods = pods
        """Without a backend, where the trial runs instead: a throwaway pod (the kubernetes backend)."""
        self.python = python
        self.artifacts = ArtifactStore(self.home, S3Artifacts(artifacts_s3_url) if artifacts_s3_url else None)
        self._scan = scan
        self._review = review
        """The advisory model review (MCPFLEET_MODEL_REVIEW=on), one more check; None: not asked."""
        self.conformance_everywhere = conformance_everywhere
        """Every tenant gets the conformance fixture server, not only those that enabled it."""
        self._indexer = indexer
        self._builtin_specs = {spec.name: spec for spec in BUILTIN_SERVERS}
        self._approved: dict[int, list[Approved]] = {}
        self._specs: dict[int, ServerSpec] = {}
        self._guarded: dict[tuple[int, str], tuple[Any, Approved, dict[str, Any], dict[str, str]]] = {}
        # Per user, per server: what the guard holds back -> why (for a clear refusal of a call).
        # Tools by public name; other offerings as `prompt:<public name>`, `resource:<uri>`.
        self._withheld: dict[int, dict[str, dict[str, str]]] = defaultdict(dict)
        # (user, version) -> the (pin key, definition) drifts of it that user's sandbox listed, at most
        # DRIFTS_PER_SANDBOX of them; and the pairs past that bound, already logged.
        self._drift_seen: dict[tuple[int, int], set[tuple[str, str]]] = defaultdict(set)
        self._drift_capped: set[tuple[int, int]] = set()
        self._recorded_builtins: set[int] = set()
        self._tasks = Tasks()
        self._usage: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
        self.on_change: list[ChangeListener] = []
        self.unindexed = True
        """Some recorded definitions may lack embeddings (built-ins): search indexes them first."""

    # -- gateway lifecycle ----------------------------------------------------------------

    async def start(self, database_url: str | None) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id, conformance FROM tenants")
            for tenant_id, conformance in await cur.fetchall():
                fixtures = conformance or self.conformance_everywhere
                await store.ensure_builtins(conn, tenant_id, builtin_entries(fixtures=fixtures))
        self._spawn(self._record_builtins())
        if database_url is not None:
            # Kept through a brief outage: a running sandbox's calls go on while the database is away.
            self._spawn(follow_notifications(database_url, "registry_changed", self._changed, "registry",
                                             keep_for=self.outage_s))
        self._spawn(self._flush_usage_periodically())

    async def close(self) -> None:
        await self._tasks.close()
        await self._flush_usage()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._tasks.spawn(coroutine)

    def _changed(self) -> None:
        previous = self._approved
        self._approved = {}
        self._guarded.clear()
        if previous:
            self._spawn(self._tell_changed(previous))

    async def _tell_changed(self, previous: dict[int, list[Approved]]) -> None:
        changed = set()
        for user_id, before in previous.items():
            try:
                if await self.approved(user_id) != before:
                    changed.add(user_id)
            except RegistryError as exc:
                if exc.status != 404:  # 404: the user was removed (`mcpfleet users remove`); nobody to tell
                    log.exception("could not recompute what user %s may run", user_id)
            except Exception:
                log.exception("could not recompute what user %s may run", user_id)
        if changed:
            for listener in self.on_change:
                try:
                    await listener(changed)
                except Exception:
                    log.exception("a registry change listener failed")

    # -- what a user may run (the sandbox manager's server source) ------------------------

    async def approved(self, user_id: int) -> list[Approved]:
        cached = self._approved.get(user_id)
        if cached is None:
            try:
                cached = await self._read_approved(user_id)
            except UNREACHABLE as exc:
                raise DatabaseUnavailable("Finding which servers you may run") from exc
            self._approved[user_id] = cached
        return cached

    async def _read_approved(self, user_id: int) -> list[Approved]:
        async with self.pool.connection() as conn:
            approved = await store.approved_for(conn, user_id)
            tenants_missing_builtins = not any(a.builtin for a in approved) and not await _has_builtins(conn, user_id)
            if tenants_missing_builtins:  # a tenant made after the gateway started
                tenant_id, conformance = await _tenant_of(conn, user_id)
                fixtures = conformance or self.conformance_everywhere
                await store.ensure_builtins(conn, tenant_id, builtin_entries(fixtures=fixtures))
                approved = await store.approved_for(conn, user_id)
        return approved

    async def servers_for(self, user_id: int | None) -> tuple[ServerSpec, ...]:
        if user_id is None:  # the warm pool: the product's built-in servers until a user claims it
            return tuple(sorted(PRODUCT_SERVERS, key=lambda s: s.name))
        specs = []
        for approved in await self.approved(user_id):
            spec = await self._spec(approved)
            if spec is not None:
                specs.append(spec)
        return tuple(sorted(specs, key=lambda s: s.name))

    async def _spec(self, approved: Approved) -> ServerSpec | None:
        if approved.builtin:
            return self._builtin_specs.get(approved.prefix)
        spec = self._specs.get(approved.version_id)
        if spec is None:
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(
                        "SELECT manifest, validation, layer_sha256, layer FROM registry_versions WHERE id = %s", (approved.version_id,)
                    )
                    document, validation, layer_sha256, layer = await cur.fetchone()  # type: ignore[misc]
                manifest = parse_manifest(document)
                if layer_sha256 != approved.layer_sha256:  # versions are immutable: a changed row is not what was approved
                    raise ArtifactError(f"its dependency layer {layer_sha256} is not the approved {approved.layer_sha256}")
                if layer_sha256 is not None and layer_digest(layer) != layer_sha256:
                    raise ArtifactError(f"its recorded dependencies do not hash to its layer digest {layer_sha256}")
                spec = await asyncio.to_thread(self._published_spec, approved, manifest, validation, layer)
            except (ArtifactError, ManifestError, OSError) as exc:
                log.error("approved %s %s cannot run: %s", approved.server, approved.version, exc)
                return None
            self._specs[approved.version_id] = spec
        return spec

    def _published_spec(
        self, approved: Approved, manifest: Manifest, validation: list[dict[str, Any]], layer: list[dict[str, Any]]
    ) -> ServerSpec:
        """The console script validation found when it read the wheel's metadata (read once, at
        publish: neither a gateway's start nor a sandbox's reads it again)."""
        assert approved.artifact_sha256 is not None
        package = next((c for c in validation if c.get("check") == "package"), {})
        entry_point = package.get("entry_point")
        if not entry_point:
            raise ArtifactError(f"validation found no console script {manifest.command!r} in the wheel")
        self.artifacts.install(approved.artifact_sha256)
        wheels = tuple(p["sha256"] for p in layer)
        if approved.layer_sha256 is not None:
            self.artifacts.install_layer(approved.layer_sha256, list(wheels))
        return server_spec(approved.prefix, approved.artifact_sha256, entry_point, manifest.fleet.secrets, manifest.name,
                           egress=manifest.fleet.egress, inference=manifest.fleet.inference,
                           layer=approved.layer_sha256, layer_wheels=wheels)

    def provision(self, tools_dir: Path, servers: Sequence[ServerSpec]) -> None:
        layers = {s.layer: list(s.layer_wheels) for s in servers if s.layer}
        self.artifacts.link_into(tools_dir, {s.revision for s in servers if s.revision != "builtin"} | set(layers), layers)

    # -- publish and validate ---------------------------------------------------------------

    async def publish(self, who: Identity, document: dict[str, Any], wheel: bytes, *, manifest_source: str = "") -> dict[str, Any]:
        """`manifest_source`: where an onboarded package's server.json came from (registry.onboard_manifest)."""
        try:
            manifest = parse_manifest(document)
        except ManifestError as exc:
            raise RegistryError(400, "the manifest is invalid: " + "; ".join(exc.problems)) from None
        if len(wheel) > MAX_WHEEL_BYTES:
            raise RegistryError(413, f"the wheel is {len(wheel)} bytes; at most {MAX_WHEEL_BYTES} are taken")
        try:  # a zip bomb or a lying header is refused before anything is kept or unpacked
            await asyncio.to_thread(verify_wheel, wheel)
        except ArtifactError as exc:
            raise RegistryError(400, f"the wheel is refused: {exc}") from None
        sha256 = await asyncio.to_thread(self.artifacts.store, wheel)
        async with self.pool.connection() as conn:
            version_id = await store.publish(
                conn,
                who,
                name=manifest.name,
                prefix=manifest.prefix,
                version=manifest.version,
                manifest=document,
                artifact_sha256=sha256,
                artifact_bytes=len(wheel),
            )
        self._spawn(self._validate(who, version_id, manifest, sha256, manifest_source))
        return {"name": manifest.name, "version": manifest.version, "status": "validating", "artifact_sha256": sha256}

    async def _validate(self, who: Identity, version_id: int, manifest: Manifest, sha256: str, source: str = "") -> None:
        checks: list[dict[str, Any]] = [{"check": "manifest", "ok": True, "detail": "server.json is valid" + (f", {source}" if source else ""),
                                         "findings": [], "source": source or "the upload"}]
        trial = TrialResult()
        try:
            package = await asyncio.to_thread(self._check_package, manifest, sha256)
            checks.append(package)
            layers: dict[str, Path] = {}
            runnable = package["ok"]
            if runnable and manifest.registry_type == "npm":  # what npm resolved, packed in the wheel: reported, pinned by its digest
                npm = await asyncio.to_thread(npm_packages_check, self.artifacts.wheel_path(sha256))
                checks.append(npm)
                runnable = npm["ok"]
            if runnable:
                deps = await asyncio.to_thread(dependency_check, package["requires"], self.python, self.artifacts.store)
                checks.append(deps)
                async with self.pool.connection() as conn:
                    await store.record_layer(conn, version_id, deps["layer_sha256"], deps["packages"])
                if deps["layer_sha256"]:
                    wheels = [p["sha256"] for p in deps["packages"]]
                    layers[deps["layer_sha256"]] = await asyncio.to_thread(self.artifacts.install_layer, deps["layer_sha256"], wheels)
                runnable = deps["ok"]  # the trial runs the tool with its dependencies, or not at all
                # What the wheels would do besides being imported (.pth, shadowing, RECORD, install scripts...)
                checks += await asyncio.to_thread(code_checks, self.artifacts.wheel_path(sha256), manifest.command, deps["packages"],
                                                  self.artifacts.wheel_path, self.python.site_packages,
                                                  npm=manifest.registry_type == "npm")
            if runnable:
                spec = server_spec(manifest.prefix, sha256, package["entry_point"], manifest.fleet.secrets, manifest.name,
                                   layer=deps["layer_sha256"], layer_wheels=tuple(p["sha256"] for p in deps["packages"]))
                install = await asyncio.to_thread(self.artifacts.install, sha256)
                if self.backend is not None:
                    trial = await trial_run(self.backend, self.home, spec, install, layers=layers)
                elif self.pods is not None:
                    trial = await trial_in_pod(self.pods, spec)
                else:
                    trial.error = f"not run: {self.no_trial_reason}"
            checks.append(trial_check(trial, manifest.fleet.memory_mb, runnable))
            others = await self._other_tools(who.tenant, manifest.name)
            checks.extend(self._scan_checks(manifest.prefix, trial.tools, others, trial.offerings))
            if self._review is not None and trial.tools:
                checks.append(await self._review.check(who, trial.tools))
        except Exception as exc:  # validation must end in a verdict, whatever broke
            log.exception("validating %s %s failed", manifest.name, manifest.version)
            checks.append({"check": "validation", "ok": False, "detail": f"validation could not finish: {exc}", "findings": []})
        async with self.pool.connection() as conn:
            status = await store.record_validation(
                conn, version_id, validation=checks, tools=trial.tools, start_ms=trial.start_ms, memory_bytes=trial.memory_bytes,
                offerings=trial.offerings,
            )
        log.info("%s %s validated: %s", manifest.name, manifest.version, status)
        if self._indexer is not None and trial.tools:
            try:
                await self._indexer(version_id, manifest.prefix, trial.tools)
            except Exception:
                log.exception("indexing %s %s for search failed", manifest.name, manifest.version)

    def _check_package(self, manifest: Manifest, sha256: str) -> dict[str, Any]:
        problems = []
        entry_point = None
        try:
            metadata, scripts = wheel_metadata(self.artifacts.wheel_path(sha256))
        except ArtifactError as exc:
            return {"check": "package", "ok": False, "detail": str(exc), "findings": []}
        if canonicalize_name(str(metadata.get("Name", ""))) != canonicalize_name(manifest.package):
            problems.append(f"the wheel is {metadata.get('Name')!r}, the manifest's package is {manifest.package!r}")
        if str(metadata.get("Version")) != manifest.version:
            problems.append(f"the wheel's version is {metadata.get('Version')}, the manifest's {manifest.version}")
        entry_point = scripts.get(manifest.command)
        if entry_point is None:
            problems.append(f"the wheel has no console script {manifest.command!r} (it has: {', '.join(scripts) or 'none'})")
        return {
            "check": "package",
            "ok": not problems,
            "detail": "; ".join(problems) or f"console script {manifest.command} → {entry_point}",
            "findings": [],
            "entry_point": entry_point,
            "requires": list(metadata.get("Requires-Dist") or []),
        }

    def _scan_checks(
        self, prefix: str, tools: list[dict[str, Any]], others: Mapping[str, str], offerings: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        if self._scan is None:
            return []
        from registry.scan import CHECKS

        findings = self._scan(prefix, tools, others, offerings=offerings)
        checks = []
        for check in CHECKS:
            mine = [f.as_dict() for f in findings if f.check == check]
            checks.append(
                {"check": check, "ok": not mine, "detail": f"{len(mine)} finding(s)" if mine else "nothing found", "findings": mine}
            )
        return checks

    async def _other_tools(self, tenant: str, name: str) -> dict[str, str]:
        """Public tool names of the tenant's other approved servers -> their server's name."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT DISTINCT s.name, s.prefix, v.tools FROM approvals a JOIN registry_versions v ON v.id = a.version_id"
                " JOIN registry_servers s ON s.id = a.server_id JOIN tenants t ON t.id = s.tenant_id"
                " WHERE t.name = %s AND a.revoked_at IS NULL AND s.name <> %s",
                (tenant, name),
            )
            rows = await cur.fetchall()
        return {f"{prefix}__{tool['name']}": server for server, prefix, tools in rows for tool in tools}

    # -- the rug-pull guard -------------------------------------------------------------------

    async def guard(self, user_id: int, per_server: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        """The user's servers' offers with everything withheld whose live definition is not the
        pinned one (new ones included) or that the approval does not allow: tools, prompts,
        resources, resource templates and instructions alike; servers not approved for the user dropped."""
        approved = {a.prefix: a for a in await self.approved(user_id)}
        out: dict[str, Mapping[str, Any]] = {}
        for server, entry in per_server.items():
            grant = approved.get(server)
            if grant is None:
                self._withheld[user_id].pop(server, None)
                continue  # still running from before a revocation: the sandbox is being reconfigured
            if grant.builtin:
                if grant.version_id not in self._recorded_builtins and entry.get("tools"):
                    self._recorded_builtins.add(grant.version_id)
                    self._spawn(self._record_builtin(grant, list(entry["tools"])))
                out[server] = entry
                continue
            cached = self._guarded.get((user_id, server))
            if cached is not None and cached[0] is entry and cached[1] == grant:
                out[server] = cached[2]
                self._withheld[user_id][server] = cached[3]
                continue
            filtered, reasons, drifted = guarded_offer(server, entry, grant)
            for key, live, definition in drifted:
                self._note_drift(user_id, grant, key, live, definition)
            self._guarded[(user_id, server)] = (entry, grant, filtered, reasons)
            self._withheld[user_id][server] = reasons
            out[server] = filtered
        return out

    def why_unavailable(self, user_id: int, public_name: str, kind: str = "tool") -> str | None:
        """Why the guard holds back this tool (or `kind` "prompt" by public name, "resource" by URI) from the user, if it does."""
        key = public_name if kind == "tool" else f"{kind}:{public_name}"
        return next((r[key] for r in self._withheld.get(user_id, {}).values() if key in r), None)

    def version_of(self, user_id: int, server: str) -> str | None:
        """`name@version` of the server the user's requests go to (for audit entries)."""
        grant = next((a for a in self._approved.get(user_id, ()) if a.prefix == server), None)
        return f"{grant.server}@{grant.version}" if grant is not None else None

    def _note_drift(self, user_id: int, grant: Approved, key: str, live: str, definition: dict[str, Any]) -> None:
        """Record a drift the user's sandbox listed, once per pin key and definition, and no more than
        DRIFTS_PER_SANDBOX distinct ones per version (the store enforces the same bound across gateways)."""
        sandbox = (user_id, grant.version_id)
        seen = self._drift_seen[sandbox]
        if (key, live) in seen:
            return
        if len(seen) >= DRIFTS_PER_SANDBOX:
            if sandbox not in self._drift_capped:
                self._drift_capped.add(sandbox)
                log.warning("%s %s: the sandbox of user %s lists more than %d drifted definitions; withheld, not recorded",
                            grant.server, grant.version, user_id, DRIFTS_PER_SANDBOX)
            return
        seen.add((key, live))
        log.warning("%s %s: %s in the sandbox of user %s differs from its pin; withheld",
                    grant.server, grant.version, key, user_id)
        self._spawn(self._record_drift(grant, key, live, definition, user_id))

    async def _record_drift(self, grant: Approved, key: str, live: str, definition: dict[str, Any], user_id: int) -> None:
        async with self.pool.connection() as conn:
            await store.record_drift(conn, grant, key, live, definition, user_id, per_sandbox=DRIFTS_PER_SANDBOX)

    async def _record_builtins(self) -> None:
        """Built-in versions not yet described get their definitions (and embeddings) now."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT v.id, s.prefix FROM registry_versions v JOIN registry_servers s ON s.id = v.server_id"
                " WHERE s.builtin AND v.tools = '[]'::jsonb"
            )
            missing = await cur.fetchall()
        if not missing:
            return
        listings = await builtin_tools()
        for version_id, prefix in missing:
            if prefix in listings:
                await self._record_builtin(
                    Approved("", prefix, "", version_id, True, None, {}), listings[prefix]
                )

    async def _record_builtin(self, grant: Approved, tools: list[dict[str, Any]]) -> None:
        async with self.pool.connection() as conn:
            if await store.record_builtin_tools(conn, grant.version_id, tools):
                # Embedded at the next search, not now: loading the model costs seconds of CPU that
                # a gateway which never searches should not spend at start.
                self.unindexed = True

    # -- usage ----------------------------------------------------------------------------------

    def record_call(self, user_id: int, server: str, tool: str, ok: bool, elapsed_ms: float) -> str | None:
        """Counted in memory, written every few seconds: a call never waits for it. Returns the
        version of the server the call went to (for the audit entry)."""
        grant = next((a for a in self._approved.get(user_id, ()) if a.prefix == server), None)
        if grant is None:
            return None
        counters = self._usage[(grant.version_id, tool)]
        counters[0] += 1
        counters[1] += 0 if ok else 1
        counters[2] += elapsed_ms
        counters[3] = max(counters[3], elapsed_ms)
        return f"{grant.server}@{grant.version}"

    async def _flush_usage_periodically(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._flush_usage()

    async def _flush_usage(self) -> None:
        if not self._usage:
            return
        batch, self._usage = self._usage, defaultdict(lambda: [0, 0, 0.0, 0.0])
        rows = [(vid, tool, int(c[0]), int(c[1]), c[2], c[3]) for (vid, tool), c in batch.items()]
        try:
            async with self.pool.connection() as conn:
                await store.record_usage(conn, rows)
        except Exception as exc:
            log.warning("tool usage of %d tools not recorded: %s", len(rows), exc)


async def _tenant_of(conn: Any, user_id: int) -> tuple[int, bool]:
    """The user's tenant, and whether it runs the conformance fixture server."""
    cur = await conn.execute(
        "SELECT t.id, t.conformance FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = %s", (user_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise RegistryError(404, f"no user {user_id}")
    return row[0], row[1]


async def _has_builtins(conn: Any, user_id: int) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM registry_servers s JOIN users u ON u.tenant_id = s.tenant_id WHERE u.id = %s AND s.builtin LIMIT 1",
        (user_id,),
    )
    return await cur.fetchone() is not None

