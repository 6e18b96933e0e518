"""Sandboxes cloned from a tier's template checkpoint (`sandbox.templates`), on real runsc: a clone
sees its own user's workspace and nothing of the template's or another clone's, gets a token of its
own, hibernates and resumes as any sandbox, and a clone that fails leaves the user a booted sandbox."""

from __future__ import annotations

import shutil

import pytest

from sandbox import store, tiers
from sandbox.layout import read_token
from sandbox.manager import SandboxManager
from sandbox.store import State
from sandbox.templates import Template
from tests.conftest import make_fleet
from tests.test_gateway_lifecycle import run, sandboxes, wait_for
from tests.test_sandbox_backends import workspace_of
from tests.test_sandbox_lifecycle import call, fleets, gateway_dies, row_of  # noqa: F401 - fleets is a fixture
from tests.test_sandbox_supervisor import text

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")


async def template_of(manager: SandboxManager) -> Template:
    """The default tier's template, once its build (begun by the manager's start) is done."""
    async with manager.pool.connection() as conn:
        tier = await tiers.get(conn, tiers.DEFAULT_TIER)
    assert manager.templates is not None
    assert await manager.templates.wait(tier), "the template was not built"
    template = manager.templates.template(tier)
    assert template is not None
    return template


async def test_clones_see_only_their_own_users_workspace(fleets):
    fleet = await fleets("cln", clone_templates=True)
    manager = await fleet.manager()
    template = await template_of(manager)
    # Whatever is in the template's own workspace dir stays out of every clone.
    (template.layout.workspace / "planted.txt").write_text("from the template")
    alice, bob = await fleet.user("alice"), await fleet.user("bob")
    a = await manager.ensure(*alice)
    b = await manager.ensure(*bob)
    # Both restored the template's memory: one supervisor, started once, in both.
    assert a.client.supervisor["started_at"] == b.client.supervisor["started_at"]
    # Its fork server came with it, its imports done: the first call only forks.
    code, out = await manager.backend.run_inside(a.id, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert code == 0 and "sandbox.supervisor.zygote" in out, out
    assert (await row_of(fleet.pool, a.id))["state"] == State.RUNNING
    assert text(await call(a, "write_file", path="/workspace/alice.txt", text="alice's")) == "written"
    assert "alice's" == text(await call(a, "read_file", path="/workspace/alice.txt"))
    for clone in (a, b):
        assert "planted" not in text(await call(clone, "read_file", path="/workspace/planted.txt"))
    assert "alice's" not in text(await call(b, "read_file", path="/workspace/alice.txt"))
    with workspace_of(manager, alice[0]) as on_host:
        assert (on_host / "alice.txt").read_text() == "alice's"
        assert not (on_host / "planted.txt").exists()


async def test_a_clone_has_a_token_of_its_own_and_hibernates_and_resumes(fleets):
    fleet = await fleets("clt", clone_templates=True)
    manager = await fleet.manager()
    template = await template_of(manager)
    carol = await fleet.user("carol")
    sandbox = await manager.ensure(*carol)
    assert read_token(sandbox.layout) != template.token
    first = int(text(await call(sandbox, "counter")))
    assert await manager.hibernate(carol[0])
    # The resumed supervisor's hello must carry the clone's token (the one on disk) to be let in.
    resumed = await manager.ensure(*carol)
    assert resumed.id == sandbox.id
    assert int(text(await call(resumed, "counter"))) == first + 1


async def test_a_failed_clone_boots_the_users_sandbox_instead(fleets):
    fleet = await fleets("clf", clone_templates=True)
    manager = await fleet.manager()
    template = await template_of(manager)
    for image in template.image.iterdir():
        image.write_bytes(b"not a checkpoint")
    dave = await fleet.user("dave")
    sandbox = await manager.ensure(*dave)
    assert text(await call(sandbox, "echo", text="booted")) == "booted"
    assert manager.templates is not None and manager.templates.template(template.tier) is None
    async with fleet.pool.connection() as conn:
        rows = [r for r in await store.list_sandboxes(conn, include_ended=True) if r["user_id"] == dave[0]]
    failed, running = sorted(rows, key=lambda r: r["created_at"])
    assert failed["state"] == State.FAILED and "clone did not start" in failed["reason"], failed
    assert running["id"] == sandbox.id and running["state"] == State.RUNNING


async def test_through_the_gateway_new_users_get_clones_and_a_returning_user_keeps_their_workspace(
    tmp_path_factory, postgres_url
):
    fleet = make_fleet(tmp_path_factory, postgres_url, MCPFLEET_SANDBOX_CLONES="on", MCPFLEET_WARM_POOL_SIZE="1")
    fleet.start()
    try:
        wait_for(lambda: "sandbox template" in fleet.log() and " ready in " in fleet.log(), what="the template")
        alice = fleet.add_user("alice")
        await run(fleet, alice, "echo kept > /workspace/kept.txt; echo in-memory > /tmp/note")
        # Reclaimed, alice's next call starts a new sandbox for her workspace: cloned, since the
        # pool's sandboxes are for users without one.
        assert "reclaim default/alice: done" in fleet.cli("sandboxes", "reclaim", "alice").stdout
        out = await run(fleet, alice, "cat /workspace/kept.txt; cat /tmp/note 2>/dev/null || echo fresh; ls /workspace")
        assert out["stdout"] == "kept\nfresh\nkept.txt\n"
        [row] = [r for r in sandboxes(fleet) if r["user"] == "alice"]
        assert f"sandbox {row['id']} of default/alice cloned from tpl-" in fleet.log()
        # The pool refills with clones, which new users claim.
        [warm] = wait_for(lambda: [r for r in sandboxes(fleet) if r["user_id"] is None and r["state"] == "Running"],
                          what="a warm sandbox")
        assert f"sandbox {warm['id']} (warm pool) cloned from tpl-" in fleet.log()
        bob = fleet.add_user("bob")
        out = await run(fleet, bob, "ls -A /workspace; echo end")
        assert out["stdout"] == "end\n", out
        [mine] = [r for r in sandboxes(fleet) if r["user"] == "bob"]
        assert mine["id"] == warm["id"]
    finally:
        fleet.stop()


async def test_the_next_gateway_removes_the_templates_a_killed_one_left_and_builds_its_own(fleets):
    fleet = await fleets("clr", clone_templates=True)
    first = await fleet.manager()
    old = await template_of(first)
    await gateway_dies(first)  # its template's dir, image and mounted workspace stay behind
    assert old.image.is_dir() and first.workspaces.mounted(old.layout.sandbox_id) is not None
    second = await fleet.manager()
    assert not old.layout.dir.exists()
    assert not second.workspaces.exists(old.layout.sandbox_id) and second.workspaces.mounted(old.layout.sandbox_id) is None
    new = await template_of(second)
    assert new.layout.sandbox_id != old.layout.sandbox_id
    erin = await fleet.user("erin")
    sandbox = await second.ensure(*erin)
    assert text(await call(sandbox, "echo", text="cloned")) == "cloned"
