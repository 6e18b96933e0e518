"""The McpSandbox and McpSandboxPool lifecycle, as kopf handlers (read top to bottom as the state machine).

States (`status.state`) and what an SRE sees:

| From          | Trigger                                              | To          | Conditions                         | Event (reason)      |
|---------------|------------------------------------------------------|-------------|------------------------------------|---------------------|
| (new)         | McpSandbox created, operatingMode Running            | Starting    | WorkspaceReady True, Ready False   | Starting            |
| (new)         | created with poolRef, a ready pool pod relabelled (none ready with its spec.traces, or published servers to fetch: cold, as above) | Running | Ready True | Claimed |
| (new)         | created with operatingMode Hibernated                | Hibernated  | Hibernated True, Ready False       | Hibernated          |
| Starting      | the pod is Running and Ready                         | Running     | Ready True (endpoint podIP:7070)   | Ready               |
| Resuming      | the pod is Running and Ready                         | Running     | Ready True, Hibernated False       | Ready               |
| Running       | operatingMode → Hibernated (gateway, or idle timer)  | Hibernated  | Hibernated True, Ready False       | Hibernated          |
| Hibernated    | operatingMode → Running (the gateway wakes it)       | Resuming    | Hibernated False, Ready False      | Resuming            |
| Running       | the pod vanished (node lost, evicted)                | Starting    | Ready False                        | PodLost             |
| Starting, Resuming, Running | the pod's phase is Failed, or a container waits in CrashLoopBackOff, ImagePullBackOff, … | Failed | Ready False (that reason), no endpoint | Failed (Warning) |
| Starting, Resuming | the pod not Ready MCPFLEET_START_DEADLINE_S after its creation | Failed | Ready False StartDeadlineExceeded | Failed (Warning) |
| Starting, Resuming | the pod found Ready at the next check (MCPFLEET_IDLE_CHECK_S) when its event was missed | Running | Ready True | Ready |
| Failed        | the pod comes good (Running and Ready)               | Running     | Ready True                         | Running             |
| Failed        | the spec changes, the annotation mcpfleet.dev/retry changes, or the pod is deleted | Starting | Ready False (a new pod) | Starting |
| Running       | no activity for MCPFLEET_IDLE_HIBERNATE_S            | (patches operatingMode Hibernated)        | IdleHibernate       |
| any           | McpSandbox deleted (finalizer)                       | Reclaimed, then gone | Ready False Reclaimed; pod, Secret, ConfigMap, NetworkPolicy deleted; PVC too if retention Delete | Reclaimed |
| any           | the operator restarts                                | (unchanged) | objects re-ensured (adopted), pods not duplicated  | Adopted |

The pools (pools.py, registered with these) keep `spec.replicas` unclaimed pods (labels `mcpfleet.dev/pool: NAME`, `mcpfleet.dev/claimed: "false"`)
and reports `status.replicas` (ready unclaimed pods) and `status.selector` (for `kubectl scale`).

Every handler is idempotent: creating what exists (409) is done, deleting what is gone (404) is done, and a
claim that loses a race (409 on the pod's resourceVersion) re-reads and takes the next pod. Two operator
replicas don't fight: kopf's peering (a KopfPeering object, MCPFLEET_OPERATOR_PEERING) lets one act.
The gateway patches the annotation `mcpfleet.dev/last-activity`; it is mirrored into `status.lastActivity`.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf

from mcpfleet_operator import kube, objects, pools  # importing pools registers its handlers too
from mcpfleet_operator.objects import GROUP, VERSION
from mcpfleet_operator.settings import Settings

SANDBOXES = "mcpsandboxes"
CONFIG = Settings.from_env()  # timers' intervals are fixed when the handlers are registered


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _status(current: dict[str, Any] | None, generation: int | None, state: str, reason: str,
            **conditions: tuple[str, str]) -> dict[str, Any]:
    """A status patch: the state, its one-sentence reason, and the conditions given as type=(status, reason)."""
    conds = list((current or {}).get("conditions") or [])
    for type_, (value, why) in conditions.items():
        conds = objects.condition(conds, type_, value, why, reason, now=_now(), generation=generation)
    return {"state": state, "reason": reason, "conditions": conds, "observedGeneration": generation}


def _transition(body: dict[str, Any], patch: kopf.Patch | None, state: str, reason: str, *, warning: bool = False,
                **conditions: tuple[str, str]) -> None:
    """Record a transition: the status (through kopf's patch, or directly when outside the object's handler) and an
    Event (a Warning when `warning`)."""
    new = _status(body.get("status"), body["metadata"].get("generation"), state, reason, **conditions)
    if patch is not None:
        patch.status.update(new)
    else:
        kube.patch_cr_status(SANDBOXES, body["metadata"]["namespace"], body["metadata"]["name"], {"status": new})
    (kopf.warn if warning else kopf.info)(body, reason=state, message=reason)


def _fail(body: dict[str, Any], patch: kopf.Patch | None, why: str, message: str) -> None:
    """State Failed, Ready False for `why`, a Warning Event, no endpoint; once per cause (a crash-looping pod
    changes often, and every change would otherwise be another Event)."""
    status = body.get("status") or {}
    ready_reason = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if status.get("state") == "Failed" and ready_reason == why:
        return
    if patch is not None:
        patch.status["endpoint"] = None
    else:
        kube.patch_cr_status(SANDBOXES, body["metadata"]["namespace"], body["metadata"]["name"], {"status": {"endpoint": None}})
    _transition(body, patch, "Failed", message, warning=True, Ready=("False", why))


# --- operator start -------------------------------------------------------------------------------

@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "mcpfleet.dev/cleanup"
    # Progress and the last-handled state in annotations: the CRDs' status schema is the contract's, not kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.mcpfleet.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.mcpfleet.dev")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300


# --- McpSandbox: create, adopt, hibernate, wake ---------------------------------------------------

def _ensure_support(body: dict[str, Any], logger: logging.Logger) -> None:
    """The workspace PVC (unless a claimed pool volume serves), the token Secret, the supervisor's
    ConfigMap, the NetworkPolicy."""
    meta, spec = body["metadata"], body.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    labels = objects.sandbox_labels(name)
    if not (meta.get("annotations") or {}).get(objects.WORKSPACE_CLAIM):
        # Not owned: the retention policy, not the garbage collector, decides the workspace's fate.
        kube.create("PersistentVolumeClaim", ns, objects.pvc(objects.workspace_name(name), spec.get("workspace") or {}, labels))
    token = objects.token(CONFIG.fleet_key(), ns, name, meta["uid"])
    secret = objects.secret(objects.secret_name(name), token, labels)
    kopf.adopt(secret, owner=body)
    kube.create("Secret", ns, secret)
    _ensure_servers(body)


def _ensure_servers(body: dict[str, Any]) -> None:
    """What follows from spec.servers, created or brought up to date: the supervisor's ConfigMap and
    the NetworkPolicy (egress only to the gateway, when published servers are fetched). Patched as a
    whole when they exist, so an operator that was down while the servers changed catches up on resume."""
    meta, spec = body["metadata"], body.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    labels = objects.sandbox_labels(name)
    config = objects.config_map(objects.config_map_name(name), spec.get("servers"), labels, bool(spec.get("traces")))
    kopf.adopt(config, owner=body)
    if not kube.create("ConfigMap", ns, config):
        kube.patch("ConfigMap", ns, config["metadata"]["name"], {"data": config["data"]})
    policy = objects.network_policy(name, {objects.SANDBOX_LABEL: name}, spec.get("servers"))
    policy["metadata"]["labels"].update(labels)
    kopf.adopt(policy, owner=body)
    if not kube.create("NetworkPolicy", ns, policy):
        kube.patch("NetworkPolicy", ns, name, {"spec": {"egress": policy["spec"]["egress"]}})


def _ensure_pod(body: dict[str, Any]) -> dict[str, Any] | None:
    """The sandbox's pod, created when absent; returns the existing pod when there is one (never a second)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    current = (body.get("status") or {}).get("podName") or name
    existing = kube.read("Pod", ns, current)
    if existing is not None and not existing["metadata"].get("deletionTimestamp"):
        return existing
    pod = objects.sandbox_pod(body, CONFIG.image, tools_image=CONFIG.tools_image, gateway_url=CONFIG.gateway_url)
    kopf.adopt(pod, owner=body)
    kube.create("Pod", ns, pod)
    return None


@kopf.on.create(GROUP, VERSION, SANDBOXES)
def sandbox_created(body: kopf.Body, spec: kopf.Spec, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    body = dict(body)
    name = body["metadata"]["name"]
    if spec.get("operatingMode", "Running") == "Hibernated":
        _ensure_support(body, logger)
        _transition(body, patch, "Hibernated", "Created hibernated: no pod until it is woken.",
                    Hibernated=("True", "Created"), Ready=("False", "Hibernated"), WorkspaceReady=("True", "Created"))
        return
    if spec.get("poolRef") and objects.published_digests(spec.get("servers")):
        # A warm pod was started before anyone's servers were known, so it fetched no published wheels.
        logger.info(f"Not claiming from pool {spec['poolRef']}: published servers are fetched only at a pod's start.")
    elif spec.get("poolRef"):
        pod = pools.claim(body, logger)
        if pod is not None:
            pod_name = pod["metadata"]["name"]
            ns = body["metadata"]["namespace"]
            kube.patch_cr(SANDBOXES, ns, name, {"metadata": {"annotations": {objects.WORKSPACE_CLAIM: objects.workspace_name(pod_name)}}})
            body["metadata"].setdefault("annotations", {})[objects.WORKSPACE_CLAIM] = objects.workspace_name(pod_name)
            _ensure_support(body, logger)
            patch.status.update({"podName": pod_name, "endpoint": f"{pod['status']['podIP']}:{objects.PORT}",
                                 "tokenSecret": objects.secret_name(name)})
            _transition(body, patch, "Running", f"Claimed the warm pod {pod_name} from pool {spec['poolRef']}.",
                        Ready=("True", "Claimed"), Hibernated=("False", "Claimed"), WorkspaceReady=("True", "Claimed"))
            return
        logger.info(f"Pool {spec['poolRef']} has no ready pod with traces {bool(spec.get('traces'))}; starting cold.")
    _ensure_support(body, logger)
    _ensure_pod(body)
    patch.status.update({"podName": name, "tokenSecret": objects.secret_name(name)})
    _transition(body, patch, "Starting", "Created its workspace, token and network policy, and its pod.",
                WorkspaceReady=("True", "Created"), Ready=("False", "PodStarting"), Hibernated=("False", "Created"))


@kopf.on.resume(GROUP, VERSION, SANDBOXES)
def sandbox_adopted(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch,
                    logger: logging.Logger, **_: Any) -> None:
    """After an operator restart: re-ensure what the sandbox should have; an existing pod is kept, never doubled."""
    body = dict(body)
    _ensure_support(body, logger)
    if spec.get("operatingMode", "Running") == "Hibernated":
        return
    pod = _ensure_pod(body)
    if pod is not None and objects.pod_ready(pod) and status.get("state") != "Running":
        _mark_ready(body, pod, patch)
    kopf.info(body, reason="Adopted", message="The operator resumed handling this sandbox.")


@kopf.on.field(GROUP, VERSION, SANDBOXES, field="spec.operatingMode")
def operating_mode_changed(body: kopf.Body, old: Any, new: Any, reason: kopf.Reason, status: kopf.Status, patch: kopf.Patch,
                           logger: logging.Logger, **_: Any) -> None:
    old, new = old or "Running", new or "Running"  # unset is the CRD's default, Running
    if reason == kopf.Reason.CREATE or old == new:  # the creation is sandbox_created's
        return
    body = dict(body)
    ns = body["metadata"]["namespace"]
    if new == "Hibernated":
        kube.delete("Pod", ns, status.get("podName") or body["metadata"]["name"])
        patch.status.update({"endpoint": None})
        _transition(body, patch, "Hibernated", "The pod was deleted; the workspace volume is kept.",
                    Hibernated=("True", "OperatingMode"), Ready=("False", "Hibernated"))
    elif new == "Running":
        _ensure_support(body, logger)
        # A woken sandbox gets its own pod name back, on the same workspace volume.
        body.setdefault("status", {})["podName"] = body["metadata"]["name"]
        _ensure_pod(body)
        patch.status.update({"podName": body["metadata"]["name"]})
        _transition(body, patch, "Resuming", "Recreating the pod on the same workspace volume.",
                    Hibernated=("False", "OperatingMode"), Ready=("False", "PodStarting"))


@kopf.on.field(GROUP, VERSION, SANDBOXES, field="spec.traces")
def traces_changed(body: kopf.Body, reason: kopf.Reason, **_: Any) -> None:
    """The gateway began or stopped exporting traces: the ConfigMap follows. The running pod keeps what
    its supervisor read at its start (restarting it would end its user's work); its next pod (a wake,
    a lost pod) serves its servers the trace endpoint, or not."""
    if reason != kopf.Reason.CREATE:
        _ensure_servers(dict(body))


@kopf.on.field(GROUP, VERSION, SANDBOXES, field="spec.servers")
def servers_changed(body: kopf.Body, old: Any, new: Any, reason: kopf.Reason, status: kopf.Status, patch: kopf.Patch,
                    logger: logging.Logger, **_: Any) -> None:
    """The approved servers changed: the ConfigMap and the NetworkPolicy follow. The running pod is not
    restarted for it (that would end its user's work): the gateway reconfigures its supervisor over the
    channel, as it must anyway to hand over the servers' secrets, and every later pod (a wake, a
    lost pod) starts from the new ConfigMap. Except when published wheels came that the pod has not
    fetched: their code is only ever put in at a pod's start, so a new pod fetches them."""
    # Also at creation: kopf runs this after sandbox_created, possibly on a newer body (the servers changed
    # meanwhile), and that change is then part of what it counts as created, never reported as an update.
    body = dict(body)
    _ensure_servers(body)
    if reason == kopf.Reason.CREATE:
        return
    kopf.info(body, reason="ServersChanged", message="The supervisor's config and network policy follow spec.servers.")
    added = set(objects.published_digests(new)) - set(objects.published_digests(old))
    mode = (body.get("spec") or {}).get("operatingMode", "Running")
    if added and mode == "Running" and status.get("state") in ("Starting", "Resuming", "Running"):
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        kube.delete("Pod", ns, status.get("podName") or name)
        body.setdefault("status", {})["podName"] = name
        _ensure_pod(body)  # where the old pod is still terminating, its DELETED event recreates it
        patch.status.update({"podName": name, "endpoint": None})
        _transition(body, patch, "Starting", f"A new pod fetches {len(added)} newly approved published server(s).",
                    Ready=("False", "PodStarting"))


def _mark_ready(sandbox: dict[str, Any], pod: dict[str, Any], patch: kopf.Patch | None) -> None:
    endpoint = f"{pod['status']['podIP']}:{objects.PORT}"
    extra = {"endpoint": endpoint, "podName": pod["metadata"]["name"]}
    if patch is not None:
        patch.status.update(extra)
    else:
        kube.patch_cr_status(SANDBOXES, sandbox["metadata"]["namespace"], sandbox["metadata"]["name"], {"status": extra})
    _transition(sandbox, patch, "Running", f"The pod is ready at {endpoint}.", Ready=("True", "PodReady"), Hibernated=("False", "PodReady"))


def _restarting(sandbox: dict[str, Any], message: str, why: str) -> None:
    """State Starting for a new pod, written directly (outside kopf's patch). A pod that became Ready while
    this was written (its event read the state before it) would leave Starting for good: it is looked at
    again afterwards, and its readiness is recorded here then."""
    meta = sandbox["metadata"]
    ns, name = meta["namespace"], meta["name"]
    kube.patch_cr_status(SANDBOXES, ns, name, {"status": {"podName": name, "endpoint": None}})
    _transition(sandbox, None, "Starting", message, Ready=("False", why))
    pod = kube.read("Pod", ns, name)
    if pod is not None and not pod["metadata"].get("deletionTimestamp") and objects.pod_ready(pod):
        current = kube.read_cr(SANDBOXES, ns, name)
        if current is not None and (current.get("status") or {}).get("state") == "Starting":
            _mark_ready(current, pod, None)


@kopf.on.event("", "v1", "pods", labels={objects.SANDBOX_LABEL: kopf.PRESENT})
def sandbox_pod_changed(type: str, body: kopf.Body, namespace: str, logger: logging.Logger, **_: Any) -> None:
    """Pod Running+Ready → sandbox Running; pod gone while it should run → recreate it (Starting)."""
    name = body["metadata"]["labels"][objects.SANDBOX_LABEL]
    sandbox = kube.read_cr(SANDBOXES, namespace, name)
    if sandbox is None or sandbox["metadata"].get("deletionTimestamp"):
        return
    status = sandbox.get("status") or {}
    if status.get("podName") and status["podName"] != body["metadata"]["name"]:
        return  # an older pod of this sandbox
    mode = (sandbox.get("spec") or {}).get("operatingMode", "Running")
    if type == "DELETED":
        # Pods are named after their sandbox: a retry's new pod can exist before the old one's DELETED event
        # arrives, and that event is then no loss.
        current = kube.read("Pod", namespace, body["metadata"]["name"])
        if current is not None and current["metadata"].get("uid") != body["metadata"].get("uid"):
            return
        # A Failed sandbox's pod deleted (by an SRE, say) is recreated too: that is a retry.
        if mode == "Running" and status.get("state") in ("Running", "Starting", "Resuming", "Failed"):
            sandbox.setdefault("status", {})["podName"] = name
            _ensure_pod(sandbox)
            _restarting(sandbox, "The pod was lost; a new one is starting on the same workspace.", "PodLost")
        return
    if mode != "Running" or status.get("state") not in ("Starting", "Resuming", "Running", "Failed"):
        return
    failure = objects.pod_failure(dict(body))
    if failure is not None:
        _fail(sandbox, None, *failure)
    elif objects.pod_ready(dict(body)) and status.get("state") != "Running":
        _mark_ready(sandbox, dict(body), None)  # also the recovery of a Failed sandbox whose pod came good


@kopf.timer(GROUP, VERSION, SANDBOXES, interval=CONFIG.idle_check_s, initial_delay=CONFIG.idle_check_s)
def start_deadline(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
    """A pod not Ready MCPFLEET_START_DEADLINE_S after its creation (unschedulable, a probe never passing, an
    image still pulling) fails the sandbox, so that the gateway stops waiting and an SRE sees why; a pod
    Ready while its sandbox still says Starting or Resuming makes it Running."""
    if CONFIG.start_deadline_s <= 0 or status.get("state") not in ("Starting", "Resuming"):
        return
    pod = kube.read("Pod", meta["namespace"], status.get("podName") or meta["name"])
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return
    if objects.pod_ready(pod):
        # Ready, yet the sandbox says otherwise: a Ready event that raced a Starting written after it. Levels,
        # not edges, decide: the sandbox is Running.
        if (body.get("spec") or {}).get("operatingMode", "Running") == "Running":
            _mark_ready(dict(body), pod, patch)
        return
    created = _parse_time(pod["metadata"].get("creationTimestamp"))
    if created is None:
        return
    waited = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
    if waited >= CONFIG.start_deadline_s:
        _fail(dict(body), patch, "StartDeadlineExceeded",
              f"The pod {pod['metadata']['name']} was not ready {int(waited)} s after its creation "
              f"(MCPFLEET_START_DEADLINE_S={CONFIG.start_deadline_s:g}).")


def _retry_asked(diff: kopf.Diff) -> bool:
    """A change of the spec, or of the retry annotation (`kubectl annotate mcpsb NAME mcpfleet.dev/retry=$(date +%s)`)."""
    return any(_changes(d, ("spec",)) or _changes(d, ("metadata", "annotations", objects.RETRY)) for d in diff)


def _changes(item: kopf.DiffItem, path: tuple[str, ...]) -> bool:
    """The diff item changes `path` (kopf reports a first annotation as the whole annotations dict added)."""
    if item.field[:len(path)] == path:
        return True
    if path[:len(item.field)] != item.field:
        return False
    old, new = item.old, item.new
    for key in path[len(item.field):]:
        old = old.get(key) if isinstance(old, dict) else None
        new = new.get(key) if isinstance(new, dict) else None
    return bool(old != new)


@kopf.on.update(GROUP, VERSION, SANDBOXES, when=lambda status, **_: (status or {}).get("state") == "Failed")
def failed_retried(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, diff: kopf.Diff, patch: kopf.Patch,
                   logger: logging.Logger, **_: Any) -> None:
    """Failed, and the spec changed or a retry was asked: a fresh pod on the same workspace (Starting)."""
    if not _retry_asked(diff) or spec.get("operatingMode", "Running") == "Hibernated":
        return  # a hibernation is operating_mode_changed's
    body = dict(body)
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    old_pod = status.get("podName") or name
    body.setdefault("status", {})["podName"] = name
    # Starting is written before the old pod is deleted (and not through kopf's patch, applied after this
    # returns): its DELETED event may recreate the pod at once, and that pod's first Ready event must find
    # Starting, or its Running would be overwritten by it.
    _restarting(body, "Retrying after a failure: a new pod on the same workspace volume.", "PodStarting")
    kube.delete("Pod", ns, old_pod)
    _ensure_support(body, logger)
    _ensure_pod(body)  # where the old pod is still terminating, its DELETED event recreates it (Starting)


@kopf.on.field(GROUP, VERSION, SANDBOXES, field=["metadata", "annotations", objects.LAST_ACTIVITY])
def last_activity_mirrored(new: Any, patch: kopf.Patch, **_: Any) -> None:
    if new:
        patch.status["lastActivity"] = new


@kopf.timer(GROUP, VERSION, SANDBOXES, interval=CONFIG.idle_check_s, initial_delay=CONFIG.idle_check_s)
def idle_hibernate(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, logger: logging.Logger, **_: Any) -> None:
    """Hibernate a sandbox nobody used for MCPFLEET_IDLE_HIBERNATE_S (by patching its operatingMode, as the gateway would)."""
    if CONFIG.idle_hibernate_s <= 0 or status.get("state") != "Running" or body.get("spec", {}).get("operatingMode") == "Hibernated":
        return
    last = (_parse_time((meta.get("annotations") or {}).get(objects.LAST_ACTIVITY)) or _parse_time(status.get("lastActivity"))
            or _parse_time(meta.get("creationTimestamp")))
    if last is None:
        return
    idle = (datetime.datetime.now(datetime.UTC) - last).total_seconds()
    if idle >= CONFIG.idle_hibernate_s:
        kube.patch_cr(SANDBOXES, meta["namespace"], meta["name"], {"spec": {"operatingMode": "Hibernated"}})
        kopf.info(dict(body), reason="IdleHibernate", message=f"No activity for {int(idle)} s; hibernating.")


@kopf.on.delete(GROUP, VERSION, SANDBOXES)
def sandbox_deleted(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, logger: logging.Logger, **_: Any) -> None:
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    # Said before the finalizer lets go: the last state a watcher (or `kubectl get -w`) sees, and an Event that stays.
    _transition(dict(body), None, "Reclaimed", "Deleted: its pod, token, config and network policy are removed.",
                Ready=("False", "Reclaimed"))
    pod_name = status.get("podName") or name
    kube.delete("Pod", ns, pod_name)
    if pod_name != name:
        kube.delete("Pod", ns, name)
        kube.delete("Secret", ns, objects.secret_name(pod_name))
    kube.delete("Secret", ns, objects.secret_name(name))
    kube.delete("ConfigMap", ns, objects.config_map_name(name))
    kube.delete("NetworkPolicy", ns, name)
    workspace = (meta.get("annotations") or {}).get(objects.WORKSPACE_CLAIM) or objects.workspace_name(name)
    if ((spec.get("workspace") or {}).get("retention") or "Keep") == "Delete":
        kube.delete("PersistentVolumeClaim", ns, workspace)
        logger.info(f"Deleted the pod, token, network policy and workspace {workspace} (retention Delete).")
    else:
        logger.info(f"Deleted the pod, token and network policy; kept the workspace {workspace} (retention Keep).")
