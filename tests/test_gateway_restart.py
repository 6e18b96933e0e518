"""A gateway killed outright and started again: its users' sandboxes are adopted, nothing is orphaned."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from sandbox.gvisor import choose
from tests.clients import connect, structured
from tests.conftest import make_fleet


def runsc_containers(fleet) -> dict[str, str]:
    # The runsc the fleet's gateway runs (the same environment chooses it).
    out = subprocess.run([choose().runsc, "--root", str(fleet.home / "runsc"), "list", "-format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return {c["id"]: c["status"] for c in (json.loads(out) or [])}


async def sh(fleet, key: str, command: str) -> dict:
    async with connect(fleet.mcp_url, key) as client:
        return structured(await client.call_tool("exec__run", {"command": command, "timeout_s": 30}))


@pytest.fixture
def own_fleet(tmp_path_factory, postgres_url):
    fleet = make_fleet(tmp_path_factory, postgres_url)
    fleet.start()
    yield fleet
    fleet.stop()


async def test_sigkilled_gateway_adopts_running_sandboxes(own_fleet):
    key = own_fleet.add_user("erin")
    await sh(own_fleet, key, "echo still-here > /tmp/memory-only")
    (before,) = json.loads(own_fleet.cli("sandboxes", "list", "--json").stdout)
    assert runsc_containers(own_fleet) == {before["id"]: "running"}

    own_fleet.stop(signal.SIGKILL)
    own_fleet.start()

    # The same sandbox answers, with what it held in memory: it was adopted, not restarted.
    out = await sh(own_fleet, key, "cat /tmp/memory-only")
    assert out["stdout"].strip() == "still-here"
    (after,) = json.loads(own_fleet.cli("sandboxes", "list", "--json").stdout)
    assert after["id"] == before["id"] and after["state"] == "Running"
    assert runsc_containers(own_fleet) == {before["id"]: "running"}


async def test_graceful_stop_leaves_no_runsc_process(own_fleet):
    key = own_fleet.add_user("frank")
    await sh(own_fleet, key, "true")
    assert len(runsc_containers(own_fleet)) == 1
    own_fleet.stop(signal.SIGTERM)
    assert runsc_containers(own_fleet) == {}
    processes = subprocess.run(["pgrep", "-f", f"runsc.*{own_fleet.home}"], capture_output=True, text=True).stdout
    assert processes == "", processes
    rows = json.loads(own_fleet.cli("sandboxes", "list", "--json", "--all").stdout)
    assert [r["state"] for r in rows] == ["Reclaimed"]
