"""An idle supervisor's memory: what it imports at start stays within what it needs before any
server starts. Every module held is resident in each idle sandbox (bench/fresh_memory.py measures
it); those below are needed only on a rarer path and are imported there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAZY = ("pathlib", "secrets", "random", "shutil", "urllib.parse", "ssl", "lzma", "bz2")
"""Imported only where used: pathlib by the gateway's side of the config, secrets/random replaced by
os.urandom, shutil on a server's first start, urllib.parse for a plain http:// proxy request; the TLS
and compression modules never (`sandbox/supervisor/__main__.py`)."""


def modules_at_start(flags: list[str]) -> set[str]:
    """The modules a supervisor holds once imported, started as `python -m sandbox.supervisor` would
    be (its __main__ up to the call of main), in a fresh interpreter. Without `site`: what the
    test's own virtualenv adds at start (an editable install's finder) is not the supervisor's."""
    main_source = (ROOT / "sandbox" / "supervisor" / "__main__.py").read_text().replace("sys.exit(main())", "")
    probe = main_source + "\nimport json as _json, sys as _sys\nprint(_json.dumps(sorted(k for k, v in _sys.modules.items() if v is not None)))\n"
    out = subprocess.run(
        [sys.executable, *flags, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    ).stdout
    return set(json.loads(out))


def test_an_idle_supervisor_does_not_import_what_only_a_rare_path_needs():
    held = modules_at_start(["-s", "-S"])
    assert "sandbox.supervisor.main" in held  # the probe did import the supervisor
    assert not held & set(LAZY), f"imported at start: {sorted(held & set(LAZY))}"
