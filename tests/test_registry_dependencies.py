"""Tools with their own dependencies: resolved from the real PyPI at publish, kept as a read-only
layer, pinned by the approval, importable in a real runsc sandbox, refused clearly when unresolvable."""

from __future__ import annotations

import json
import shutil
import time

import psycopg
import pytest

from registry.dependencies import layer_digest
from tests.clients import connect, structured, text_of
from tests.test_registry import cli, project, registry_fleet  # noqa: F401  (a fixture)
from tests.test_sdk import mcpfleet

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")

SLUGGER = '''
import slugify

@server.tool()
def slug(text: str) -> dict:
    """Make a URL slug of a text."""
    return {"slug": slugify.slugify(text), "from": slugify.__file__}

@server.tool()
def tamper() -> str:
    """Try to change the dependency the tool runs with."""
    try:
        with open(slugify.__file__, "a") as f:
            f.write("print('owned')\\n")
    except OSError as exc:
        return f"refused: {exc.strerror}"
    return "written"
'''


def with_dependencies(root, dependencies: list[str]) -> None:
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('dependencies = ["mcp==2.3.0"]', f"dependencies = {json.dumps(dependencies)}"))


def shown(fleet, name: str, version: str) -> dict:
    return json.loads(cli(fleet, fleet.keys["admin"], "registry", "show", name, version, "--json").stdout)


async def test_a_tool_with_dependencies_runs_with_its_resolved_read_only_layer(registry_fleet, tmp_path):
    fleet = registry_fleet
    root = project(tmp_path, "io.example/slugger", "1.0.0", SLUGGER)
    # python-slugify pulls in text-unidecode: a transitive dependency, resolved too. mcp is the runtime's.
    with_dependencies(root, ["mcp>=1.0", "python-slugify==8.0.4"])
    started = time.perf_counter()
    published = cli(fleet, fleet.keys["publisher"], "publish", str(root))
    print(f"\npublish with dependencies (resolve, download, trial) {time.perf_counter() - started:.1f} s")
    assert "passed" in published.stdout, published.stdout + published.stderr
    version = shown(fleet, "io.example/slugger", "1.0.0")
    deps = next(c for c in version["validation"] if c["check"] == "dependencies")
    assert deps["ok"], deps
    names = {p["name"].lower(): p for p in deps["packages"]}
    assert set(names) == {"python-slugify", "text-unidecode"}, names  # nothing the runtime already has (mcp, pydantic)
    assert names["python-slugify"]["version"] == "8.0.4"
    assert all(len(p["sha256"]) == 64 and p["url"].startswith(("https://", "file://")) for p in deps["packages"])
    assert deps["layer_sha256"] == layer_digest(deps["packages"]) == version["layer_sha256"]
    # The code they bring is scanned too (registry/scan_code.py): real wheels, nothing to flag.
    code = {c["check"]: c for c in version["validation"]}
    assert code["dependency code"]["ok"] and code["dependency code"]["detail"] == "3 wheel(s) scanned: nothing found", code
    assert code["dependency notes"]["findings"] == [], code
    layer = fleet.home / "registry" / "installed" / deps["layer_sha256"]
    assert (layer / "slugify" / "__init__.py").is_file() and (layer / "text_unidecode").is_dir()

    approved = cli(fleet, fleet.keys["admin"], "registry", "approve", "io.example/slugger", "1.0.0")
    assert f"dependency layer is pinned: sha256 {deps['layer_sha256']}" in approved.stdout
    with psycopg.connect(fleet.database_url) as conn:
        (pinned,) = conn.execute(
            "SELECT a.layer_sha256 FROM approvals a JOIN registry_versions v ON v.id = a.version_id"
            " WHERE v.layer_sha256 = %s AND a.revoked_at IS NULL", (deps["layer_sha256"],)
        ).fetchone()
    assert pinned == deps["layer_sha256"]

    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        result = structured(await client.call_tool("slugger__slug", {"text": "Héllo Wörld, ça va?"}))
        assert result["slug"] == "hello-world-ca-va"  # text-unidecode at work
        assert result["from"].startswith(f"/opt/tools/{deps['layer_sha256']}/")
        # The layer is shared and read-only: the tool cannot change what it (or another sandbox) runs.
        answer = text_of(await client.call_tool("slugger__tamper", {}))
        assert answer.startswith("refused"), answer
    assert "owned" not in (layer / "slugify" / "__init__.py").read_text()


async def test_a_layer_changed_after_approval_is_not_run(registry_fleet):
    """The approval pins the layer's digest: a version row rewritten afterwards (another stored wheel
    in its lock, its layer digest recomputed to match) is not what was approved, and is not run."""
    fleet = registry_fleet
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        row = conn.execute("SELECT v.id, v.layer, v.artifact_sha256 FROM registry_versions v JOIN registry_servers s"
                           " ON s.id = v.server_id WHERE s.name = 'io.example/slugger'").fetchone()
        assert row is not None, "needs the approved slugger of the test before"
        version_id, lock, own_wheel = row
        swapped = [{**p, "sha256": own_wheel} if p["name"].lower() == "text-unidecode" else p for p in lock]
        conn.execute("UPDATE registry_versions SET layer = %s, layer_sha256 = %s WHERE id = %s",
                     (json.dumps(swapped), layer_digest(swapped), version_id))
    fleet.stop()
    fleet.start()  # a gateway that reads the version afresh
    async with connect(fleet.mcp_url, fleet.keys["member"]) as client:
        assert not any(t.name.startswith("slugger__") for t in (await client.list_tools()).tools)
    assert f"its dependency layer {layer_digest(swapped)} is not the approved" in fleet.log()


def test_a_dependency_that_cannot_be_resolved_fails_validation_saying_which(registry_fleet, tmp_path):
    fleet = registry_fleet
    root = project(tmp_path, "io.example/nodeps", "1.0.0", SLUGGER)
    with_dependencies(root, ["python-slugify==8.0.4", "mcpfleet-no-such-package-xyz==1.0"])
    published = cli(fleet, fleet.keys["publisher"], "publish", str(root), check=False)
    version = shown(fleet, "io.example/nodeps", "1.0.0")
    assert version["status"] == "failed", published.stdout
    checks = {c["check"]: c for c in version["validation"]}
    assert not checks["dependencies"]["ok"]
    assert "mcpfleet-no-such-package-xyz" in checks["dependencies"]["detail"]
    assert "No matching distribution" in checks["dependencies"]["detail"], checks["dependencies"]["detail"]
    assert checks["trial"]["detail"].startswith("not run")
    assert version["layer_sha256"] is None


def test_dev_runs_a_project_with_dependencies_as_the_registry_would(tmp_path, home):
    root = project(tmp_path, "io.example/slugdev", "1.0.0", SLUGGER)
    with_dependencies(root, ["python-slugify==8.0.4"])
    done = mcpfleet("dev", str(root), "--call", "slug", "--args", '{"text": "Ça marche"}', MCPFLEET_HOME=str(home))
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"slug": "ca-marche"' in done.stdout, done.stdout
