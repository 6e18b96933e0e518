"""Durable long calls through the gateway: the MCP Tasks extension (gateway/tasks.py, core/mcp_tasks.py).

A real gateway (`mcpfleet up`) over the project's PostgreSQL, the `conformance` fixture server in
each user's sandbox: its `slow_compute` tool may run as a task. Every request is a stateless
2026-07-28 POST of its own that declares the extension, as the conformance suite's client sends it.
The suite (tests/test_conformance.py) checks the wire shapes; these tests check what the fleet
promises beyond them: a task is its owner's alone, it outlives the gateway process that answered
it, a task whose runner died says so, and expired tasks are deleted.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import make_fleet

REVISION = "2026-07-28"
EXTENSION = "io.modelcontextprotocol/tasks"
SLOW = "conformance__slow_compute"
ORPHAN_S = 4  # a running task whose gateway has been silent this long is declared failed, in this fleet
PER_USER = 3  # tasks one user may run at once, in this fleet

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Any]:
    running = make_fleet(
        tmp_path_factory, postgres_url, MCPFLEET_CONFORMANCE="on",
        MCPFLEET_TASK_HEARTBEAT_S="1", MCPFLEET_TASK_ORPHAN_S=str(ORPHAN_S), MCPFLEET_TASKS_PER_USER=str(PER_USER),
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keys(fleet: Any) -> dict[str, str]:
    fleet.cli("tenants", "add", "other-tenant")
    made = {
        "alice": fleet.add_user("alice-tasks"),
        "bob": fleet.add_user("bob-tasks"),  # same tenant as alice
        "carol": fleet.add_user("carol-tasks", tenant="other-tenant"),
    }
    for key in made.values():  # their sandboxes start now, not inside a test's timing
        assert "result" in call(fleet, key, "tools/list", {}), "no sandbox"
    return made


def call(fleet: Any, key: str, method: str, params: dict[str, Any], *, declare: bool = True) -> dict[str, Any]:
    """One stateless request with the 2026-07-28 envelope; the JSON-RPC response."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": REVISION,
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}, "extensions": {EXTENSION: {}}} if declare else {},
        "io.modelcontextprotocol/clientInfo": {"name": "tasks-tests", "version": "1"},
    }
    name = params.get("name") or params.get("taskId")
    response = httpx.post(
        fleet.mcp_url,
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}},
        headers={
            "Authorization": f"Bearer {key}", "MCP-Protocol-Version": REVISION, "Mcp-Method": method,
            **({"Mcp-Name": name} if name else {}), "Accept": "application/json, text/event-stream",
        },
        timeout=180,
    )
    if response.headers["content-type"].startswith("application/json"):
        return response.json()
    messages = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    answers = [m for m in messages if "result" in m or "error" in m]
    assert answers, response.text[-500:]
    return answers[-1]


def start_task(fleet: Any, key: str, seconds: float, label: str) -> str:
    answer = call(fleet, key, "tools/call", {"name": SLOW, "arguments": {"seconds": seconds, "label": label}})
    created = answer["result"]
    assert created["resultType"] == "task", created
    assert created["status"] == "working" and created["ttlMs"] > 0 and "result" not in created
    return created["taskId"]


def get(fleet: Any, key: str, task_id: str) -> dict[str, Any]:
    answer = call(fleet, key, "tasks/get", {"taskId": task_id})
    assert "result" in answer, answer
    return answer["result"]


def wait_terminal(fleet: Any, key: str, task_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = get(fleet, key, task_id)
        if task["status"] in ("completed", "failed", "cancelled"):
            return task
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} still {task['status']} after {timeout} s")


def test_a_task_is_created_polled_to_completion_and_its_result_read(fleet: Any, keys: dict[str, str]) -> None:
    started = time.perf_counter()
    task_id = start_task(fleet, keys["alice"], 2, "first")
    created = time.perf_counter()
    # Durable before it is handed out: the very next tasks/get finds it.
    assert get(fleet, keys["alice"], task_id)["status"] == "working"
    print(f"\ntask created in {(created - started) * 1e3:.0f} ms, "
          f"a tasks/get answered in {(time.perf_counter() - created) * 1e3:.0f} ms")
    done = wait_terminal(fleet, keys["alice"], task_id)
    assert done["status"] == "completed", done
    assert done["result"]["content"][0]["text"] == "Computed first after 2 s.", done
    assert "error" not in done and done["resultType"] == "complete"


def test_without_the_extension_the_same_call_runs_plainly(fleet: Any, keys: dict[str, str]) -> None:
    answer = call(fleet, keys["alice"], "tools/call", {"name": SLOW, "arguments": {"seconds": 0}}, declare=False)
    assert answer["result"]["resultType"] == "complete" and "taskId" not in answer["result"], answer
    refused = call(fleet, keys["alice"], "tasks/get", {"taskId": "anything"}, declare=False)
    assert refused["error"]["code"] == -32021, refused


@pytest.mark.parametrize("intruder", ["bob", "carol"])  # the owner's tenant, and another tenant
def test_another_user_cannot_get_cancel_update_or_list_a_task(fleet: Any, keys: dict[str, str], intruder: str) -> None:
    task_id = start_task(fleet, keys["alice"], 3, f"private-{intruder}")
    other = keys[intruder]
    for method, params in (
        ("tasks/get", {"taskId": task_id}),
        ("tasks/cancel", {"taskId": task_id}),
        ("tasks/update", {"taskId": task_id, "inputResponses": {}}),
    ):
        answer = call(fleet, other, method, params)
        # Exactly what a task id that never existed gets: nothing tells the intruder it is real.
        assert answer.get("error", {}).get("code") == -32602, (method, answer)
        unknown = call(fleet, other, method, {**params, "taskId": "never-was"})
        assert answer["error"]["message"].replace(task_id, "X") == unknown["error"]["message"].replace("never-was", "X")
    # There is no method that lists or fetches tasks at all (SEP-2663 removed tasks/list and tasks/result).
    for method in ("tasks/list", "tasks/result"):
        assert call(fleet, other, method, {"taskId": task_id})["error"]["code"] == -32601
    done = wait_terminal(fleet, keys["alice"], task_id)
    assert done["status"] == "completed", "the intruder's cancel must not have reached the task"
    assert f"private-{intruder}" in done["result"]["content"][0]["text"]


def test_a_task_waits_for_its_owners_input_and_nobody_elses(fleet: Any, keys: dict[str, str]) -> None:
    answer = call(fleet, keys["alice"], "tools/call", {"name": "conformance__confirm_delete", "arguments": {"filename": "a.txt"}})
    task_id = answer["result"]["taskId"]
    deadline = time.monotonic() + 60
    while (task := get(fleet, keys["alice"], task_id))["status"] != "input_required":
        assert time.monotonic() < deadline and task["status"] == "working", task
        time.sleep(0.3)
    (key,) = task["inputRequests"]
    assert task["inputRequests"][key]["method"] == "elicitation/create"
    forged = {key: {"action": "accept", "content": {"confirm": False, "name": "intruder"}}}
    for intruder in ("bob", "carol"):
        refused = call(fleet, keys[intruder], "tasks/update", {"taskId": task_id, "inputResponses": forged})
        assert refused["error"]["code"] == -32602, refused
    assert get(fleet, keys["alice"], task_id)["status"] == "input_required", "an intruder's answer reached the task"
    mine = {key: {"action": "accept", "content": {"confirm": True}}}
    assert call(fleet, keys["alice"], "tasks/update", {"taskId": task_id, "inputResponses": mine})["result"]["resultType"] == "complete"
    done = wait_terminal(fleet, keys["alice"], task_id)
    assert done["status"] == "completed" and done["result"]["content"][0]["text"] == "a.txt: confirm=True", done


def test_a_cancelled_task_stays_cancelled(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 60, "to-cancel")
    ack = call(fleet, keys["alice"], "tasks/cancel", {"taskId": task_id})["result"]
    assert ack == {"resultType": "complete"} or set(ack) <= {"resultType", "_meta"}, ack
    assert get(fleet, keys["alice"], task_id)["status"] == "cancelled"
    time.sleep(3)  # the stopped call must not write a result over the cancellation
    task = get(fleet, keys["alice"], task_id)
    assert task["status"] == "cancelled" and "result" not in task, task
    assert call(fleet, keys["alice"], "tasks/cancel", {"taskId": task_id})["result"]["resultType"] == "complete"


def test_one_user_cannot_run_tasks_without_bound(fleet: Any, keys: dict[str, str]) -> None:
    running = [start_task(fleet, keys["bob"], 120, f"hog-{n}") for n in range(PER_USER)]
    refused = call(fleet, keys["bob"], "tools/call", {"name": SLOW, "arguments": {"seconds": 120}})
    assert refused["error"]["code"] == -32600 and "tasks running already" in refused["error"]["message"], refused
    assert start_task(fleet, keys["carol"], 0, "not-held-back")  # the bound is per user
    for task_id in running:
        call(fleet, keys["bob"], "tasks/cancel", {"taskId": task_id})
    deadline = time.monotonic() + 60  # a cancelled task's slot is free once its call has ended
    while "error" in (answer := call(fleet, keys["bob"], "tools/call", {"name": SLOW, "arguments": {"seconds": 0}})):
        assert time.monotonic() < deadline, answer
        time.sleep(0.5)
    assert answer["result"]["resultType"] == "task"


def test_a_result_is_read_while_the_sandbox_hibernates(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 1, "before-sleep")
    done = wait_terminal(fleet, keys["alice"], task_id)
    assert "done" in fleet.cli("sandboxes", "hibernate", "alice-tasks").stdout
    assert get(fleet, keys["alice"], task_id) == done
    [row] = [r for r in json.loads(fleet.cli("sandboxes", "list", "--json").stdout) if r["user"] == "alice-tasks"]
    assert row["state"] == "Hibernated", "reading a task's result must not need (or wake) the sandbox"


def test_a_result_survives_a_gateway_restart(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 1, "durable")
    before = wait_terminal(fleet, keys["alice"], task_id)
    assert before["status"] == "completed"
    fleet.stop()
    fleet.start()  # another gateway process over the same database
    after = get(fleet, keys["alice"], task_id)
    assert after["status"] == "completed" and after["result"] == before["result"], after
    assert call(fleet, keys["bob"], "tasks/get", {"taskId": task_id})["error"]["code"] == -32602


def test_a_task_whose_gateway_died_is_reported_failed(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 120, "orphan")
    assert get(fleet, keys["alice"], task_id)["status"] == "working"
    fleet.stop(signal.SIGKILL)  # the process dies with the call: nobody will ever store its result
    fleet.start()
    failed = wait_terminal(fleet, keys["alice"], task_id, timeout=ORPHAN_S * 10)
    assert failed["status"] == "failed", failed
    assert "stopped before it finished" in failed["error"]["message"] and failed["error"]["code"] == -32603
    assert "result" not in failed


def test_a_task_running_when_the_gateway_stops_is_failed_with_the_reason(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 120, "interrupted")
    fleet.stop()  # an orderly stop: the gateway fails its running tasks itself, at once
    fleet.start()
    task = get(fleet, keys["alice"], task_id)
    assert task["status"] == "failed" and "gateway stopped" in task["error"]["message"], task


def test_expired_tasks_are_gone_and_purged(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 0, "short-lived")
    wait_terminal(fleet, keys["alice"], task_id)
    with psycopg.connect(fleet.database_url, autocommit=True) as conn:
        # Stands in for waiting out the TTL (an hour by default): the clock moves, nothing else.
        conn.execute("UPDATE mcp_tasks SET expires_at = now() - interval '1 second' WHERE id = %s", (task_id,))
        # An expired task is unknown at once, before any sweep deletes it.
        assert call(fleet, keys["alice"], "tasks/get", {"taskId": task_id})["error"]["code"] == -32602
        deadline = time.monotonic() + ORPHAN_S * 10  # the gateway sweeps every task_orphan_s / 2
        while conn.execute("SELECT count(*) FROM mcp_tasks WHERE id = %s", (task_id,)).fetchone()[0]:
            assert time.monotonic() < deadline, "the expired task was never purged"
            time.sleep(0.5)


def test_a_tasks_request_whose_mcp_name_differs_from_its_task_id_is_refused(fleet: Any, keys: dict[str, str]) -> None:
    task_id = start_task(fleet, keys["alice"], 0, "routed")
    meta = {
        "io.modelcontextprotocol/protocolVersion": REVISION,
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {EXTENSION: {}}},
    }
    response = httpx.post(
        fleet.mcp_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tasks/get", "params": {"taskId": task_id, "_meta": meta}},
        headers={
            "Authorization": f"Bearer {keys['alice']}", "MCP-Protocol-Version": REVISION, "Mcp-Method": "tasks/get",
            "Mcp-Name": "some-other-task", "Accept": "application/json, text/event-stream",
        },
        timeout=60,
    )
    # A router in front that reads the header must never be sent one task while the gateway reads another.
    assert response.status_code == 400 and response.json()["error"]["code"] == -32020, response.text
