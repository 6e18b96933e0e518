"""Circuit breakers (gateway/breakers.py): the state machine under a fake clock here, and against a
real gateway with real gVisor sandboxes in tests/test_gateway_breakers.py."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError

from gateway.breakers import BREAKER_OPEN, WINDOW_S, Breakers, Fenced, bring_up_verdict, server_verdict
from sandbox.errors import QuotaExceeded, SandboxDetached, SandboxRpcError, SandboxUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fail(breakers: Breakers, key: object) -> bool:
    breakers.check(key, "x")
    return breakers.failed(key)


def test_opens_after_n_failures_in_a_row_then_one_probe_closes_it():
    clock = Clock()
    b = Breakers(3, 30, clock)
    assert not fail(b, "k") and not fail(b, "k")
    assert fail(b, "k")  # the third opens it
    with pytest.raises(Fenced) as fenced:
        b.check("k", "server 'flaky'")
    assert fenced.value.retry_in == 30 and "server 'flaky'" in str(fenced.value) and "retry in 30s" in str(fenced.value)
    b.check("other", "x")  # another key is not affected
    clock.now += 29.5
    with pytest.raises(Fenced):
        b.check("k", "x")
    clock.now += 1
    b.check("k", "x")  # the probe goes through...
    with pytest.raises(Fenced):
        b.check("k", "x")  # ...alone
    b.succeeded("k")
    b.check("k", "x")
    assert not fail(b, "k")  # closed, and counting from zero again


def test_a_failed_probe_reopens_for_twice_as_long():
    clock = Clock()
    b = Breakers(2, 10, clock)
    fail(b, "k")
    assert fail(b, "k")
    clock.now += 10
    b.check("k", "x")
    assert b.failed("k")  # the probe failed: open again
    assert b.retry_in("k") == 20
    clock.now += 19
    with pytest.raises(Fenced):
        b.check("k", "x")
    clock.now += 1
    b.check("k", "x")
    b.released("k")  # the probe was cancelled: the next caller may probe
    b.check("k", "x")


def test_a_success_or_a_long_pause_breaks_the_streak():
    clock = Clock()
    b = Breakers(3, 30, clock)
    fail(b, "k"), fail(b, "k")
    b.succeeded("k")
    assert not fail(b, "k") and not fail(b, "k")
    clock.now += WINDOW_S + 1
    assert not fail(b, "k") and not fail(b, "k")
    assert fail(b, "k")


def test_the_guard_refuses_with_a_json_rpc_error_and_classifies_outcomes():
    clock, refused, opened = Clock(), [], []
    b = Breakers(2, 5, clock)
    b.on_refused = lambda: refused.append(1)

    def verdict(exc):
        return {"ValueError": "failure", "KeyError": "alive"}.get(type(exc).__name__)

    for _ in range(2):
        with pytest.raises(ValueError), b.guard("k", "server 'a'", verdict, opened.append):
            raise ValueError
    assert opened == [5]  # audited once per opening
    with pytest.raises(MCPError) as refusal, b.guard("k", "server 'a'", verdict, opened.append):
        raise AssertionError("a fenced call must not run")
    assert refusal.value.error.code == BREAKER_OPEN and refusal.value.error.data == {"fenced": "server 'a'", "retryAfterSeconds": 5}
    assert refused == [1]
    clock.now += 5
    with pytest.raises(KeyError), b.guard("k", "x", verdict, opened.append):
        raise KeyError  # the server answered with an error of its own: it is alive
    with b.guard("k", "x", verdict, opened.append):
        pass
    assert opened == [5]


def test_what_counts_as_a_failure():
    assert bring_up_verdict(SandboxUnavailable("did not start")) == "failure"
    assert bring_up_verdict(QuotaExceeded("tenant cap")) is None  # a full quota says nothing of the sandbox
    assert bring_up_verdict(SandboxDetached("hibernating")) is None
    assert server_verdict(SandboxRpcError(-32603, "server 'x' exited while handling the request")) == "failure"
    assert server_verdict(SandboxUnavailable("channel broke")) == "failure"
    assert server_verdict(SandboxRpcError(-32602, "Unknown tool")) == "alive"  # an answer: the server is up
    assert server_verdict(TimeoutError()) is None
