"""A stand-in for a Kubernetes API server: kmock's emulator with the semantics an operator relies on.

This is NOT Kubernetes. No API server can run on these machines; kmock (pinned, 0.8) serves the API's
shape from memory, and this subclass adds what kopf and the official client need to behave as against a
real one. It runs no controllers and no garbage collector: the tests play the kubelet (a pod's phase,
IP and readiness) themselves, and owner references delete nothing.

What kmock 0.8 lacks and this adds (each tested in tests/test_operator.py, `test_standin_*`):

| Semantic                    | kmock 0.8 as shipped                         | Here                                               |
|-----------------------------|----------------------------------------------|----------------------------------------------------|
| uid, resourceVersion        | none assigned                                | uid on create, a global resourceVersion per write  |
| generation                  | none                                         | 1 on create, +1 when anything but metadata/status changes |
| optimistic concurrency      | none                                         | a patch carrying a stale resourceVersion: 409      |
| JSON-patch `test` failure   | 500                                          | 422 Invalid                                        |
| generateName                | ignored (every Event after the first: 409)   | a random 5-character suffix                        |
| namespace from the URL      | kept only if the body has it                 | written into metadata.namespace                    |
| status subresource          | one body                                     | /status writes only status; the main URL never it  |
| lists                       | no kind, no resourceVersion                  | `<Kind>List`, the current resourceVersion          |
| watch from resourceVersion N| replays every object                         | only changes after N                               |
| GET /api/v1/namespaces      | 500 (its path parser wants a namespace name) | the cluster-scoped `namespaces` resource           |

Still as kmock ships it: label and field selectors are ignored (clients filter), watch reconnects replay
every object, no server-side tables, no admission, no defaulting from CRD schemas.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from typing import Any

import attrs
import jsonpatch
from kmock import KubernetesEmulator, KubernetesError, KubernetesObjectNotFoundError, KubernetesScaffold, action, resource
from kmock._internal import dicts, parsing

SANDBOXES = resource("mcpfleet.dev", "v1alpha1", "mcpsandboxes")
POOLS = resource("mcpfleet.dev", "v1alpha1", "mcpsandboxpools")
PODS = resource("", "v1", "pods")
PVCS = resource("", "v1", "persistentvolumeclaims")
SECRETS = resource("", "v1", "secrets")
CONFIGMAPS = resource("", "v1", "configmaps")
EVENTS = resource("", "v1", "events")
NAMESPACES = resource("", "v1", "namespaces")
NETPOLS = resource("networking.k8s.io", "v1", "networkpolicies")
PEERINGS = resource("kopf.dev", "v1", "kopfpeerings")

VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
RESOURCES: dict[resource, dict[str, Any]] = {
    NAMESPACES: dict(kind="Namespace", singular="namespace", namespaced=False),
    PODS: dict(kind="Pod", singular="pod", namespaced=True, subresources={"status"}),
    PVCS: dict(kind="PersistentVolumeClaim", singular="persistentvolumeclaim", namespaced=True, subresources={"status"}),
    SECRETS: dict(kind="Secret", singular="secret", namespaced=True),
    CONFIGMAPS: dict(kind="ConfigMap", singular="configmap", namespaced=True),
    EVENTS: dict(kind="Event", singular="event", namespaced=True),
    NETPOLS: dict(kind="NetworkPolicy", singular="networkpolicy", namespaced=True),
    PEERINGS: dict(kind="KopfPeering", singular="kopfpeering", namespaced=True),
    SANDBOXES: dict(kind="McpSandbox", singular="mcpsandbox", namespaced=True, shortnames={"mcpsb"}, subresources={"status"}),
    POOLS: dict(kind="McpSandboxPool", singular="mcpsandboxpool", namespaced=True, shortnames={"mcpsbpool"},
                subresources={"status", "scale"}),
}


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, except that `/api/v1/namespaces[/NAME]` is the namespaces resource (kopf lists it)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


# Module-wide, as kmock looks the parser up in its module on every request (only these tests use kmock).
parsing.parse_path = _parse_path


@attrs.define(kw_only=True)
class KubeStandin(KubernetesEmulator):
    """kmock's emulator plus identity, versions, concurrency and the status subresource (see the module's table)."""

    _rv: int = attrs.field(default=0, init=False)
    _interleaved: set[tuple[Any, ...]] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for res, info in RESOURCES.items():
            self.resources[res] = dict(verbs=VERBS, **info)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _has_status(self, res: resource) -> bool:
        info = RESOURCES.get(res)
        return bool(info and "status" in info.get("subresources", ()))

    # -- the writes: replaces kmock's own bookkeeping of CREATE / UPDATE / DELETE ----------------------

    async def _handle(self, request: Any) -> Any:
        gc_key = None
        if request.resource is not None and request.action in (action.CREATE, action.UPDATE, action.DELETE):
            async with self._lock:
                if request.action == action.CREATE:
                    key = await self._create(request)
                elif request.name is not None:
                    key = await (self._update(request) if request.action == action.UPDATE else self._delete(request))
                else:
                    key = None
                if key is not None and key in self._objects and not self._objects[key].deleted:
                    meta = self._objects[key].get("metadata", {})
                    if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                        gc_key = key
        try:
            return await KubernetesScaffold._handle(self, request)
        finally:
            if gc_key is not None:
                async with self._lock:
                    raw = self._objects[gc_key].raw
                    self._objects[gc_key].delete()
                    await self._buses[request.resource].put({"type": "DELETED", "object": raw})

    async def _create(self, request: Any) -> Any:
        body = copy.deepcopy(request.data or {})
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            request.data.setdefault("metadata", {})["name"] = meta["name"]  # kmock's reply finds the object by it
        if request.namespace:
            meta["namespace"] = request.namespace
        key = (request.resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise KubernetesError(status=409, reason="AlreadyExists", message=f"{meta['name']} already exists")
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1)
        meta.setdefault("creationTimestamp", _now())
        info = RESOURCES.get(request.resource, {})
        if info.get("kind"):
            body.setdefault("kind", info["kind"])
            body.setdefault("apiVersion", f"{request.resource.group}/{request.resource.version}".lstrip("/"))
        if key in self._objects:
            self._objects[key].create(body)
        else:
            self._objects[key] = body
        await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].raw})
        return key

    async def _update(self, request: Any) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise KubernetesObjectNotFoundError()
        if key in self._interleaved:  # another writer got there first: the object moved on
            self._interleaved.discard(key)
            self._objects[key].patch({"metadata": {"resourceVersion": self._next_rv()}})
        old = copy.deepcopy(self._objects[key].raw)
        patch = request.data
        if isinstance(patch, dict):
            wanted_rv = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted_rv is not None and str(wanted_rv) != old["metadata"].get("resourceVersion"):
                raise KubernetesError(status=409, reason="Conflict",
                               message="the object has been modified; please apply your changes to the latest version")
        try:
            new = dict(dicts.patch_dict(old, patch))
        except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as e:
            raise KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        new = copy.deepcopy(new)
        if self._has_status(request.resource):
            if request.subresource == "status":  # only the status moves
                new = {**old, "status": new.get("status")}
            else:  # the status stays
                new["status"] = old.get("status")
                if new["status"] is None:
                    del new["status"]
        meta = new.setdefault("metadata", {})
        for fixed in ("uid", "name", "namespace", "creationTimestamp"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
        strip = lambda b: {k: v for k, v in b.items() if k not in ("metadata", "status")}  # noqa: E731
        meta["generation"] = old["metadata"].get("generation", 1) + (1 if strip(new) != strip(old) else 0)
        meta["resourceVersion"] = self._next_rv()
        self._objects[key].create(new)
        await self._buses[request.resource].put({"type": "MODIFIED", "object": self._objects[key].raw})
        return key

    async def _delete(self, request: Any) -> Any:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise KubernetesObjectNotFoundError()
        obj = self._objects[key]
        meta = obj.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return key
        if meta.get("finalizers"):
            obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": self._next_rv()}})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            return key
        raw = obj.raw
        obj.patch({"metadata": {"resourceVersion": self._next_rv()}})
        obj.delete()
        await self._buses[request.resource].put({"type": "DELETED", "object": raw})
        return None

    async def _serve_list(self, request: Any) -> Any:
        result = dict(await super()._serve_list(request))
        info = RESOURCES.get(request.resource, {})
        result["kind"] = f"{info.get('kind', 'Object')}List"
        result["apiVersion"] = f"{request.resource.group}/{request.resource.version}".lstrip("/")
        result["metadata"] = {"resourceVersion": str(self._rv)}
        return result

    async def _serve_watch(self, request: Any) -> Any:
        # A watch from resourceVersion N sends only what changed after N (kmock replays every object first).
        since = request.params.get("resourceVersion")
        async for event in super()._serve_watch(request):
            if since and since.isdigit() and isinstance(event, dict):
                rv = (event.get("object") or {}).get("metadata", {}).get("resourceVersion") or "0"
                if rv.isdigit() and int(rv) <= int(since):
                    continue
            yield event

    # -- the tests' hands: what the kubelet and the controllers would do ------------------------------

    async def kubelet(self, res: resource, namespace: str | None, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into a stored object as a controller would (bumping resourceVersion, notifying watches)."""
        async with self._lock:
            obj = self._objects[res, namespace, name]
            obj.patch({**changes, "metadata": {**changes.get("metadata", {}), "resourceVersion": self._next_rv()}})
            await self._buses[res].put({"type": "MODIFIED", "object": obj.raw})
            return obj.raw

    def interleave_write(self, res: resource, namespace: str | None, name: str) -> None:
        """Before the next patch of this object, another writer changes it (its resourceVersion moves on)."""
        self._interleaved.add((res, namespace, name))

    def get(self, res: resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (res, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].raw

    def names(self, res: resource, namespace: str | None = None) -> list[str]:
        return sorted(n for (r, ns, n), o in list(self._objects.items())
                      if r == res and not o.deleted and (namespace is None or ns == namespace))


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
