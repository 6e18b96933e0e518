"""McpSandboxPool: keep `spec.replicas` warm pods (unclaimed, labelled `mcpfleet.dev/pool: NAME` and
`mcpfleet.dev/claimed: "false"`), report `status.replicas` (ready unclaimed pods) and `status.selector` (for
`kubectl scale`), and hand one to a sandbox that names the pool (`claim`)."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import kopf

from mcpfleet_operator import kube, objects
from mcpfleet_operator.objects import GROUP, VERSION
from mcpfleet_operator.settings import Settings

POOLS = "mcpsandboxpools"
CONFIG = Settings.from_env()  # as the sandbox handlers read it; the timer's interval is fixed at registration
_pool_locks: dict[str, threading.Lock] = {}


def claim(body: dict[str, Any], logger: logging.Logger) -> dict[str, Any] | None:
    """Relabel one ready, unclaimed pod of spec.poolRef as this sandbox's; None when the pool has none ready."""
    meta = body["metadata"]
    ns, name, pool = meta["namespace"], meta["name"], body["spec"]["poolRef"]
    traces = bool(body["spec"].get("traces"))
    for _attempt in range(5):
        # Only a pod whose supervisor relays spans as this sandbox wants (it reads that once, at start).
        ready = [p for p in kube.list_("Pod", ns, objects.pool_labels(pool)) if objects.pod_ready(p)
                 and not p["metadata"].get("deletionTimestamp") and objects.pod_traces(p) == traces]
        if not ready:
            return None
        pod = sorted(ready, key=lambda p: p["metadata"]["name"])[0]
        owner = {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": name, "uid": meta["uid"],
                 "controller": True, "blockOwnerDeletion": True}
        try:
            # Conditional on the pod's resourceVersion: two claims racing for one pod, one wins (the other gets 409).
            kube.patch("Pod", ns, pod["metadata"]["name"], {"metadata": {
                "resourceVersion": pod["metadata"]["resourceVersion"],
                "labels": {objects.CLAIMED_LABEL: "true", objects.SANDBOX_LABEL: name},
                "ownerReferences": [owner],
            }})
        except kube.ApiException as e:
            if e.status in (409, 404):
                logger.info(f"Pool pod {pod['metadata']['name']} was taken meanwhile; re-reading the pool.")
                continue
            raise
        pod_name = pod["metadata"]["name"]
        token = objects.token(CONFIG.fleet_key(), ns, name, meta["uid"])
        # Identity is bound late: the pool pod's Secret now carries this user's token, its volume is the user's.
        kube.patch("Secret", ns, objects.secret_name(pod_name), {
            "metadata": {"labels": {objects.SANDBOX_LABEL: name}, "ownerReferences": [owner]},
            "data": objects.secret(pod_name, token, {})["data"]})
        kube.patch("PersistentVolumeClaim", ns, objects.workspace_name(pod_name), {
            "metadata": {"labels": {objects.SANDBOX_LABEL: name, objects.CLAIMED_LABEL: "true"}}})
        return pod
    raise kopf.TemporaryError("every claim on the pool lost a race", delay=1)


def _fill(pool: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    meta = pool["metadata"]
    ns, name = meta["namespace"], meta["name"]
    lock = _pool_locks.setdefault(f"{ns}/{name}", threading.Lock())
    with lock:
        wanted = int((pool.get("spec") or {}).get("replicas") or 0)
        pods = [p for p in kube.list_("Pod", ns, objects.pool_labels(name)) if not p["metadata"].get("deletionTimestamp")]
        traces = objects.pool_traces(pool)
        # Pods started before the template's traces changed are replaced (unclaimed: nobody's work ends).
        for stale in [p for p in pods if objects.pod_traces(p) != traces]:
            _delete_pool_pod(ns, stale["metadata"]["name"])
        pods = [p for p in pods if objects.pod_traces(p) == traces]
        policy = objects.network_policy(f"{name}-pool", objects.pool_labels(name), None)
        config = objects.config_map(objects.pool_config_name(name), [], objects.pool_labels(name), traces)
        for shared in (policy, config):
            kopf.adopt(shared, owner=pool)
            if not kube.create(shared["kind"], ns, shared) and shared is config:
                kube.patch("ConfigMap", ns, config["metadata"]["name"], {"data": config["data"]})
        for _ in range(wanted - len(pods)):
            pod_name = f"{name}-{secrets.token_hex(3)}"
            labels = objects.pool_labels(name)
            disk_mb = ((pool.get("spec") or {}).get("tier") or {}).get("diskMb")
            size = f"{int(disk_mb)}Mi" if disk_mb else "1Gi"  # the pool has no workspace spec: the tier's disk quota sizes it
            for child in (objects.pvc(objects.workspace_name(pod_name), {"size": size}, labels),
                          objects.secret(objects.secret_name(pod_name), secrets.token_urlsafe(32), labels),
                          objects.pool_pod(pool, pod_name, CONFIG.image)):
                if child["kind"] != "PersistentVolumeClaim":
                    kopf.adopt(child, owner=pool)
                kube.create(child["kind"], ns, child)
            logger.info(f"Started warm pod {pod_name}.")
        # Too many: the not-ready ones go first.
        for extra in sorted(pods, key=objects.pod_ready)[:max(0, len(pods) - wanted)]:
            _delete_pool_pod(ns, extra["metadata"]["name"])
        ready = sum(1 for p in pods if objects.pod_ready(p))
    return {"replicas": min(ready, wanted),
            "selector": f"{objects.POOL_LABEL}={name},{objects.CLAIMED_LABEL}=false"}


def _delete_pool_pod(ns: str, pod_name: str) -> None:
    for kind, child in (("Pod", pod_name), ("Secret", objects.secret_name(pod_name)),
                        ("PersistentVolumeClaim", objects.workspace_name(pod_name))):
        kube.delete(kind, ns, child)


@kopf.on.create(GROUP, VERSION, POOLS)
@kopf.on.resume(GROUP, VERSION, POOLS)
@kopf.on.field(GROUP, VERSION, POOLS, field="spec.replicas")
@kopf.on.field(GROUP, VERSION, POOLS, field="spec.template.traces")
def pool_reconciled(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
    patch.status.update(_fill(dict(body), logger))


@kopf.timer(GROUP, VERSION, POOLS, interval=CONFIG.pool_check_s, initial_delay=CONFIG.pool_check_s)
def pool_refilled(body: kopf.Body, patch: kopf.Patch, status: kopf.Status, logger: logging.Logger, **_: Any) -> None:
    new = _fill(dict(body), logger)
    if new.get("replicas") != status.get("replicas") or new.get("selector") != status.get("selector"):
        patch.status.update(new)


@kopf.on.event("", "v1", "pods", labels={objects.POOL_LABEL: kopf.PRESENT})
def pool_pod_changed(body: kopf.Body, namespace: str, logger: logging.Logger, **_: Any) -> None:
    """A pool pod became ready, was claimed or vanished: refill the pool and report its ready count."""
    pool = kube.read_cr(POOLS, namespace, body["metadata"]["labels"][objects.POOL_LABEL])
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return
    new = _fill(pool, logger)
    if new != {k: (pool.get("status") or {}).get(k) for k in new}:
        kube.patch_cr_status(POOLS, namespace, pool["metadata"]["name"], {"status": new})
