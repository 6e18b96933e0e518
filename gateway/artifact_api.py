"""`GET /registry/v1/artifacts/{sha256}`: a published wheel, to the pod that is to run it.

On the kubernetes backend a pod has no host directory the gateway links installs into; its init
container (`registry.fetch`) downloads each wheel its McpSandbox lists. The caller proves to be
that sandbox, not a user: `Mcpfleet-Sandbox: <namespace>/<name>` names the object (in the
gateway's own namespace), and the bearer must be that object's token (`sandbox_token` of its uid,
what the operator put in the pod's Secret). A wheel is served only if its digest is one of the
object's `spec.servers[].artifactSha256`, which the gateway itself wrote from the approvals: a pod
gets what its user may run and nothing else, and a leaked token opens nothing once the object is
gone (a new object has a new uid, so a new token). The other backends link installs directly;
there the route answers 404.

Answers: 401 no or wrong credentials, 403 another namespace or a digest not in the spec, 404 not
on this backend or not in the artifact store, 503 the API server cannot be read. Refusals are
audited like other refused credentials (throttled per reason and address); every wheel served is
an `artifact.fetch` entry.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from registry.artifacts import ArtifactError
from registry.fetch import SANDBOX_HEADER
from sandbox.errors import SandboxUnavailable

if TYPE_CHECKING:
    from gateway.fleet import Fleet

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "/registry/v1/artifacts/"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def is_sandbox_request(conn: HTTPConnection) -> bool:
    """A request this route authenticates itself: its bearer is a sandbox's token, not a user's,
    so the user authentication neither tries it nor audits it as a refused user credential."""
    return conn.url.path.startswith(ARTIFACT_PREFIX) and SANDBOX_HEADER in conn.headers


def routes(fleet: Fleet) -> list[Route]:
    async def artifact(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        ip = request.client.host if request.client else "unknown"

        def refuse(status: int, message: str, sandbox: str | None = None) -> JSONResponse:
            fleet.calls.refused("sandbox artifact refused", ip, status=status, sandbox=sandbox, artifact=sha256[:64], why=message)
            return _error(status, message)

        if fleet.settings.sandbox_backend != "kubernetes":
            return _error(404, "artifacts are served to sandbox pods only on the kubernetes backend")
        from sandbox.kubernetes import KubernetesSandboxes  # the kubernetes extra, installed on this backend

        manager = fleet.manager
        assert isinstance(manager, KubernetesSandboxes)
        sandbox = request.headers.get(SANDBOX_HEADER, "").strip()
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if not sandbox or scheme.lower() != "bearer" or not token:
            return refuse(401, f"authenticate as a sandbox: Authorization: Bearer <its token> and {SANDBOX_HEADER}: <namespace>/<name>")
        namespace, _, name = sandbox.partition("/")
        if namespace != manager.namespace or not name:
            return refuse(403, f"only sandboxes in namespace {manager.namespace!r} are served ({SANDBOX_HEADER}: {manager.namespace}/<name>)", sandbox)
        try:
            obj = await manager.authenticate(name, token)
        except SandboxUnavailable as exc:
            log.warning("artifact %s for %s: %s", sha256, sandbox, exc)
            return _error(503, f"the sandbox cannot be looked up now: {exc}")
        if obj is None:
            return refuse(401, f"that is not the token of sandbox {sandbox} (or it does not exist)", sandbox)
        spec = obj.get("spec") or {}
        servers = [s for s in spec.get("servers") or [] if isinstance(s, dict)]
        # A server's wheel, and the wheels of its dependency layer (`registry.dependencies`).
        listed = {s.get("artifactSha256") for s in servers} | {w for s in servers for w in s.get("layerWheels") or []}
        if not _SHA256.match(sha256) or sha256 not in listed:
            return refuse(403, f"{sha256[:64]} is not the artifact of any server sandbox {sandbox} runs", sandbox)
        try:
            path = await asyncio.to_thread(fleet.registry.artifacts.wheel_path, sha256)
        except ArtifactError as exc:
            log.error("artifact %s: %s", sha256, exc)
            return _error(502, str(exc))
        if not path.is_file():
            return _error(404, f"no artifact {sha256} in the registry's store")
        fleet.calls.record("artifact.fetch", "ok", tenant=spec.get("tenant"), actor=spec.get("user"),
                           target=sha256, detail={"sandbox": sandbox, "ip": ip})
        return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.whl")

    return [Route(ARTIFACT_PREFIX + "{sha256}", artifact, methods=["GET"])]
