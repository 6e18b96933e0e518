"""Which runsc and platform the sandboxes get (sandbox/gvisor.py), asked of the real binaries:
Debian's runsc (2022-12 on Debian 12) and the 2024-07 one scripts/setup.sh unpacks under /opt."""

from __future__ import annotations

import shutil

import pytest

from sandbox.backends.runsc import RunscBackend
from sandbox.gvisor import PINNED_RUNSC, SYSTRAP_SINCE, choose, runsc_release

system_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc is not installed")
pinned_runsc = pytest.mark.skipif(not PINNED_RUNSC.exists(), reason="scripts/setup.sh has not unpacked gVisor 2024-07")


@pinned_runsc
def test_the_pinned_runsc_is_the_default_and_runs_on_systrap_with_uncompressed_checkpoints(monkeypatch, tmp_path):
    monkeypatch.delenv("MCPFLEET_RUNSC", raising=False)
    monkeypatch.delenv("MCPFLEET_RUNSC_PLATFORM", raising=False)
    monkeypatch.delenv("MCPFLEET_RUNSC_COMPRESS_CHECKPOINTS", raising=False)
    gvisor = choose()
    assert (gvisor.runsc, gvisor.platform, gvisor.release) == (str(PINNED_RUNSC), "systrap", 20240729)
    assert gvisor.checkpoint_flags() == ["-compression", "none"]
    backend = RunscBackend(tmp_path / "runsc")
    assert "--platform=systrap" in backend._flags() and backend.runsc == str(PINNED_RUNSC)
    monkeypatch.setenv("MCPFLEET_RUNSC_COMPRESS_CHECKPOINTS", "1")
    assert choose().checkpoint_flags() == []  # runsc's own default: compressed


@system_runsc
def test_the_settings_choose_another_runsc_and_platform(monkeypatch):
    monkeypatch.setenv("MCPFLEET_RUNSC", "runsc")
    monkeypatch.setenv("MCPFLEET_RUNSC_PLATFORM", "ptrace")
    gvisor = choose()
    assert (gvisor.runsc, gvisor.platform) == ("runsc", "ptrace")
    monkeypatch.setenv("MCPFLEET_RUNSC_PLATFORM", "qemu")
    with pytest.raises(RuntimeError, match="must be one of systrap, ptrace, kvm"):
        choose()


@system_runsc
def test_a_runsc_older_than_systrap_defaults_to_ptrace_and_refuses_systrap(monkeypatch):
    monkeypatch.delenv("MCPFLEET_RUNSC_PLATFORM", raising=False)
    release = runsc_release("runsc")
    if release is None or release >= SYSTRAP_SINCE:
        pytest.skip(f"the system's runsc is {release}, not one from before systrap")
    gvisor = choose("runsc")
    assert gvisor.platform == "ptrace" and gvisor.checkpoint_flags() == []
    with pytest.raises(RuntimeError, match="no systrap platform"):
        choose("runsc", "systrap")


def test_a_missing_runsc_has_no_release_and_falls_back_to_ptrace(tmp_path):
    gvisor = choose(str(tmp_path / "no-runsc"), None)
    assert (gvisor.release, gvisor.platform) == (None, "ptrace")
