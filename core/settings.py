"""Fleet settings, read once from the environment.

Every command and the gateway read the same variables, so `mcpfleet users add`
in one terminal and `make run` in another agree on the fleet home and database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a whole number, not {raw!r}") from None


def _positive(name: str, default: int) -> int:
    value = _int(name, default)
    if value <= 0:
        raise SystemExit(f"{name} must be a positive whole number, not {value}")
    return value


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name) or default
    if raw not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in (os.environ.get(name) or "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    home: Path
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    sandbox_backend: str = "runsc"
    """runsc or docker: sandboxes on this node; kubernetes: McpSandbox objects, pods run by the operator."""
    k8s_namespace: str = "mcpfleet"
    """kubernetes: the namespace of the McpSandbox objects."""
    sandbox_key_file: Path | None = None
    """kubernetes: the fleet's sandbox key (the Secret `mcpfleet-sandbox-key` mounted), for the pods' tokens."""
    k8s_start_timeout_s: int = 300
    """kubernetes: how long a call waits for its sandbox to be Ready (a pod scheduled, pulled, started)."""
    idle_hibernate_s: int = 600
    idle_freeze_s: int = 60
    """runsc: freeze a sandbox with no call this long and nothing running inside (0: never); the next message thaws it."""
    sandbox_clones: bool = True
    """runsc: start sandboxes as clones of a tier's template checkpoint rather than booting each (`sandbox.templates`)."""
    reclaim_after_s: int = 7 * 86400
    workspace_retention: str = "keep"
    """On reclaim: "keep" the user's workspace, or "delete" it."""
    warm_pool_size: int = 2
    max_running: int = 50
    """Running sandboxes on this node at once (the warm pool included)."""
    workspace_quotas: bool | None = None
    """Disk quotas for workspaces (loop-mounted images): None probes whether this machine can."""
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    """Host names clients reach the gateway by beyond its own address (a Service's, an ingress's), any port."""
    # Servers whose tools and prompts are shown under their own names, not `<server>__<name>`:
    # for clients that call fixed names (the MCP conformance suite calls `test_simple_text`).
    bare_servers: frozenset[str] = frozenset()
    sampling_by_fleet: frozenset[str] = frozenset()
    """Tenants whose servers' sampling the fleet's models answer, not the client ("*": all; gateway/sampling.py)."""
    model_review: bool = False
    """Validation also asks the fleet's model to review each published tool (registry/review.py): off by
    default, since the default local model (Gemma 3 270M, a base model) is far too small to judge."""
    conformance_everywhere: bool = False
    """Run the conformance fixture server (a test fixture, not product) for every tenant, not only
    for those added with `--with-conformance`: for fleets that the MCP conformance suite tests."""
    # Where clients reach `/mcp`, as OAuth tokens must name it in `aud`; None: http://HOST:PORT/mcp.
    configured_public_url: str | None = None
    # Where the other replicas reach this one (`up --replicas`: a loopback port of its own); None: host:port.
    lease_address: str | None = None
    replica_address: str | None = None
    """kubernetes: where the other replicas reach this one (POD_IP:PORT). Set, each 2025-11-25 session is
    served by the replica that opened it and the others pass its requests on (gateway/session_routes.py)."""
    # Shared by the replicas of one `up --replicas` (never by anything else): a request passed on by one
    # of them names its client in X-Forwarded-For, trusted only with this (gateway/forward.py).
    replica_secret: str | None = None
    # Proxies whose X-Forwarded-For is trusted (uvicorn's FORWARDED_ALLOW_IPS); None: nobody's.
    trusted_proxies: str | None = None
    required_scopes: tuple[str, ...] = ("mcp",)
    # Loopback and private issuers (tests, an IdP on the same network); also allows plain http.
    allow_private_issuers: bool = False
    # Per user (gateway/limits.py): requests per minute, tools/call per tool per minute (0: off), POSTs in flight.
    rate_limit_per_min: int = 600
    tool_rate_limit_per_min: int = 0
    max_concurrent_calls: int = 16
    fast_path: bool = True
    """`tools/call` served by gateway/fast_call.py beside the SDK's general path (off: every request takes
    the general path; the benchmark's baseline)."""
    # Per user (gateway/egress.py): connections out of their sandbox per minute, all servers together.
    egress_per_min: int = 120
    egress_hosts: tuple[str, ...] = ()
    """`name=address` entries the gateway resolves egress names with before DNS (`gateway.egress`):
    a name pinned to an address, as /etc/hosts would; the address is vetted all the same."""
    # Per user (gateway/sessions.py): open 2025-11-25 sessions and open GET streams; over the session
    # limit the user's oldest idle session is closed, and with none idle the new one is refused.
    max_sessions_per_user: int = 32
    max_streams_per_user: int = 16
    session_idle_s: int = 600
    """A session with no request in flight and no open stream for this long is closed."""
    input_wait_s: float = 300.0
    """A server asking a 2026-07-28 client for input (input_required) waits this long for the retry."""
    input_held_per_user: int = 32
    """Calls of one user that may wait for their input at once (each holds a server's call open)."""
    # Durable long calls (the MCP Tasks extension, gateway/tasks.py): a task and its result are kept
    # this long after it was created; a running task whose gateway process has not heartbeaten for
    # `task_orphan_s` is declared failed (the process died with its work).
    task_ttl_s: float = 3600.0
    task_heartbeat_s: float = 5.0
    task_orphan_s: float = 30.0
    tasks_per_user: int = 16
    """Tasks of one user that may run at once (each holds a call in their sandbox, off any request's limits)."""
    # The HTTP edge (gateway/http_edge.py): a request's headers, then its body, must arrive within
    # these; connections beyond `max_connections` are closed at once.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    max_result_bytes: int = 16 * 1024 * 1024
    # Circuit breakers (gateway/breakers.py): after this many failures in a row, a user's sandbox
    # bring-up, or one server in it, is fenced off for the cool-down; then one call probes it.
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0
    # A verified API key is trusted this long before the database is asked again (a revocation
    # reaches a listening gateway at once through NOTIFY; this bounds one that is not listening).
    key_cache_s: float = 30.0
    # While the database cannot be reached, keys, tool sets and approvals read within this long keep
    # serving running sandboxes' calls (core/outage.py); nothing older does.
    db_outage_s: float = 120.0
    """Largest result a server may send for one call; the gateway refuses larger ones unread."""
    # Shares the rate limits' buckets across gateways; None: each gateway counts on its own.
    redis_url: str | None = None
    # s3://bucket[/prefix]: published wheels are kept there (each gateway caches them under its home).
    artifacts_s3_url: str | None = None
    # "json": one JSON object per log line, with the trace and span ids (core/logs.py).
    log_format: str = "text"

    @property
    def data_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def public_url(self) -> str:
        return self.configured_public_url or f"http://{self.host}:{self.port}/mcp"


def load_settings(**overrides: object) -> Settings:
    home = Path(os.environ.get("MCPFLEET_HOME") or ".mcpfleet").absolute()
    values: dict[str, object] = {
        "home": home,
        "host": os.environ.get("MCPFLEET_HOST") or "127.0.0.1",
        "port": _int("MCPFLEET_PORT", 8080),
        "database_url": os.environ.get("DATABASE_URL") or None,
        "trusted_proxies": os.environ.get("FORWARDED_ALLOW_IPS") or None,
        "max_body_bytes": _int("MCPFLEET_MAX_BODY_BYTES", 4 * 1024 * 1024),
        "sandbox_backend": _choice("MCPFLEET_SANDBOX_BACKEND", ("runsc", "docker", "kubernetes"), "runsc"),
        "k8s_namespace": os.environ.get("MCPFLEET_K8S_NAMESPACE") or "mcpfleet",
        "sandbox_key_file": Path(os.environ["MCPFLEET_SANDBOX_KEY_FILE"]) if os.environ.get("MCPFLEET_SANDBOX_KEY_FILE") else None,
        "k8s_start_timeout_s": _positive("MCPFLEET_K8S_START_TIMEOUT_S", 300),
        "idle_hibernate_s": _int("MCPFLEET_IDLE_HIBERNATE_S", 600),
        "idle_freeze_s": _int("MCPFLEET_IDLE_FREEZE_S", 60),
        "sandbox_clones": _choice("MCPFLEET_SANDBOX_CLONES", ("on", "off"), "on") == "on",
        "reclaim_after_s": _int("MCPFLEET_RECLAIM_AFTER_S", 7 * 86400),
        "workspace_retention": _choice("MCPFLEET_WORKSPACE_RETENTION", ("keep", "delete"), "keep"),
        "warm_pool_size": _int("MCPFLEET_WARM_POOL_SIZE", 2),
        "max_running": _int("MCPFLEET_MAX_RUNNING", 50),
        "workspace_quotas": {"auto": None, "on": True, "off": False}[
            _choice("MCPFLEET_WORKSPACE_QUOTAS", ("auto", "on", "off"), "auto")
        ],
        "allowed_origins": _list("MCPFLEET_ALLOWED_ORIGINS"),
        "allowed_hosts": _list("MCPFLEET_ALLOWED_HOSTS"),
        "bare_servers": frozenset(_list("MCPFLEET_BARE_TOOL_NAMES")),
        "sampling_by_fleet": frozenset(_list("MCPFLEET_SAMPLING_BY_FLEET")),
        "model_review": _choice("MCPFLEET_MODEL_REVIEW", ("off", "on"), "off") == "on",
        "conformance_everywhere": _choice("MCPFLEET_CONFORMANCE", ("off", "on"), "off") == "on",
        "configured_public_url": os.environ.get("MCPFLEET_PUBLIC_URL") or None,
        # Unset means "mcp"; set but empty means no scope is required.
        "required_scopes": tuple(os.environ.get("MCPFLEET_REQUIRED_SCOPES", "mcp").replace(",", " ").split()),
        "allow_private_issuers": os.environ.get("MCPFLEET_ALLOW_PRIVATE_ISSUERS", "") in ("1", "true", "yes"),
        "rate_limit_per_min": _int("MCPFLEET_RATE_LIMIT_PER_MIN", 600),
        "tool_rate_limit_per_min": _int("MCPFLEET_TOOL_RATE_LIMIT_PER_MIN", 0),
        "max_concurrent_calls": _int("MCPFLEET_MAX_CONCURRENT_CALLS", 16),
        "fast_path": _choice("MCPFLEET_FAST_PATH", ("on", "off"), "on") == "on",
        "egress_per_min": _int("MCPFLEET_EGRESS_PER_MIN", 120),
        "egress_hosts": _list("MCPFLEET_EGRESS_HOSTS"),
        "max_sessions_per_user": _int("MCPFLEET_MAX_SESSIONS_PER_USER", 32),
        "max_streams_per_user": _int("MCPFLEET_MAX_STREAMS_PER_USER", 16),
        "session_idle_s": _positive("MCPFLEET_SESSION_IDLE_S", 600),
        "input_wait_s": _positive("MCPFLEET_INPUT_WAIT_S", 300),
        "input_held_per_user": _positive("MCPFLEET_INPUT_HELD_PER_USER", 32),
        "task_ttl_s": _positive("MCPFLEET_TASK_TTL_S", 3600),
        "task_heartbeat_s": _positive("MCPFLEET_TASK_HEARTBEAT_S", 5),
        "task_orphan_s": _positive("MCPFLEET_TASK_ORPHAN_S", 30),
        "tasks_per_user": _positive("MCPFLEET_TASKS_PER_USER", 16),
        "header_timeout_s": _positive("MCPFLEET_HEADER_TIMEOUT_S", 10),
        "body_timeout_s": _positive("MCPFLEET_BODY_TIMEOUT_S", 30),
        "breaker_failures": _positive("MCPFLEET_BREAKER_FAILURES", 3),
        "breaker_cooldown_s": _positive("MCPFLEET_BREAKER_COOLDOWN_S", 30),
        "key_cache_s": _positive("MCPFLEET_KEY_CACHE_S", 30),
        "db_outage_s": _positive("MCPFLEET_DB_OUTAGE_S", 120),
        "max_connections": _positive("MCPFLEET_MAX_CONNECTIONS", 1000),
        "max_result_bytes": _positive("MCPFLEET_MAX_RESULT_BYTES", 16 * 1024 * 1024),
        "replica_address": os.environ.get("MCPFLEET_REPLICA_ADDRESS") or None,
        "redis_url": os.environ.get("REDIS_URL") or None,
        "artifacts_s3_url": os.environ.get("MCPFLEET_ARTIFACTS_S3_URL") or None,
        "log_format": _choice("MCPFLEET_LOG_FORMAT", ("text", "json"), "text"),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]
