"""The few API calls the handlers make, through the official client, each idempotent.

kopf's login handler (`login_via_client`) configures the client as kubectl would find a cluster
(in-cluster service account, else KUBECONFIG / ~/.kube/config); these calls use that configuration.

| Call            | Idempotence                                                              |
|-----------------|--------------------------------------------------------------------------|
| create()        | 409 AlreadyExists is success: the object is there (an earlier attempt)   |
| delete()        | 404 NotFound is success: the object is gone                              |
| read()          | None when absent                                                         |
| patch*()        | merge patches; a resourceVersion in the body makes them conditional (409) |
"""

from __future__ import annotations

from typing import Any

import kubernetes.client
from kubernetes.client.rest import ApiException

from mcpfleet_operator.objects import GROUP, VERSION

Body = dict[str, Any]

_KINDS = {
    "Pod": ("pod", "CoreV1Api"),
    "PersistentVolumeClaim": ("persistent_volume_claim", "CoreV1Api"),
    "Secret": ("secret", "CoreV1Api"),
    "ConfigMap": ("config_map", "CoreV1Api"),
    "NetworkPolicy": ("network_policy", "NetworkingV1Api"),
}


def _api(kind: str) -> tuple[Any, str]:
    suffix, api_cls = _KINDS[kind]
    return getattr(kubernetes.client, api_cls)(), suffix


def _plain(obj: Any) -> Body:
    return kubernetes.client.ApiClient().sanitize_for_serialization(obj)


_SETTLED = object()
"""What `_unless` returns when the API says the object already is as asked (there, or gone)."""


def _unless(status: int, call: Any, *args: Any) -> Any:
    """`call(*args)`, or _SETTLED when the API answers `status` (409 on a create, 404 on a read or delete):
    handlers run again after any failure, so finding the work done is their normal case."""
    try:
        return call(*args)
    except ApiException as e:
        if e.status == status:
            return _SETTLED
        raise


def create(kind: str, namespace: str, body: Body) -> bool:
    """Create; True when created now, False when it already existed."""
    api, suffix = _api(kind)
    return _unless(409, getattr(api, f"create_namespaced_{suffix}"), namespace, body) is not _SETTLED


def read(kind: str, namespace: str, name: str) -> Body | None:
    api, suffix = _api(kind)
    found = _unless(404, getattr(api, f"read_namespaced_{suffix}"), name, namespace)
    return None if found is _SETTLED else _plain(found)


def list_(kind: str, namespace: str, labels: dict[str, str]) -> list[Body]:
    """Objects carrying all `labels` (filtered here too: a selector is a request, not a promise of every server)."""
    api, suffix = _api(kind)
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    items = _plain(getattr(api, f"list_namespaced_{suffix}")(namespace, label_selector=selector)).get("items") or []
    return [i for i in items if all((i["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]


def patch(kind: str, namespace: str, name: str, body: Body) -> Body:
    api, suffix = _api(kind)
    return _plain(getattr(api, f"patch_namespaced_{suffix}")(name, namespace, body))


def delete(kind: str, namespace: str, name: str) -> bool:
    """Delete; True when a deletion was asked now, False when it was already gone."""
    api, suffix = _api(kind)
    return _unless(404, getattr(api, f"delete_namespaced_{suffix}"), name, namespace) is not _SETTLED


def read_cr(plural: str, namespace: str, name: str) -> Body | None:
    found = _unless(404, kubernetes.client.CustomObjectsApi().get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
    return None if found is _SETTLED else found


def patch_cr(plural: str, namespace: str, name: str, body: Body) -> Body:
    return kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, body)


def patch_cr_status(plural: str, namespace: str, name: str, body: Body) -> Body:
    return kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body)
