"""The Python bound into sandboxes: described from a venv, chosen by the gateway, complete for the code inside."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from sandbox import factory
from sandbox.factory import SANDBOX_VENV, sandbox_python
from sandbox.runtime import current_python, venv_python

ROOT = Path(__file__).resolve().parent.parent

INSIDE = ("mcp_servers", "sandbox.supervisor", "sandbox.wire")
"""The code that runs inside a sandbox: its imports must all be satisfied by the sandbox's venv."""


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runtime") / "venv"
    venv.create(path, with_pip=False, symlinks=True)
    return path


def test_a_venv_is_described_by_its_own_interpreter(bare_venv):
    runtime = venv_python(bare_venv)
    assert runtime.prefix == Path(sys.base_prefix).resolve()
    assert runtime.executable == Path(sys.executable).resolve()
    assert runtime.version == sys.version.split()[0]
    site = bare_venv.resolve() / Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)
    assert runtime.site_packages == (site,)
    assert runtime.site_packages != current_python().site_packages


def test_what_is_not_a_venv_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="no bin/python"):
        venv_python(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("#!/bin/sh\necho broken >&2; exit 3\n")
    (tmp_path / "bin" / "python").chmod(0o755)
    with pytest.raises(RuntimeError, match=r"failed \(3\): broken"):
        venv_python(tmp_path)


def test_the_gateway_chooses_the_configured_venv_then_its_own_then_itself(bare_venv, tmp_path, monkeypatch):
    monkeypatch.setenv("MCPFLEET_SANDBOX_PYTHON", str(bare_venv))
    assert sandbox_python() == venv_python(bare_venv)
    monkeypatch.setenv("MCPFLEET_SANDBOX_PYTHON", str(tmp_path))
    with pytest.raises(RuntimeError, match="MCPFLEET_SANDBOX_PYTHON must name a venv"):
        sandbox_python()
    monkeypatch.delenv("MCPFLEET_SANDBOX_PYTHON")
    monkeypatch.setattr(factory, "SANDBOX_VENV", bare_venv)
    assert sandbox_python() == venv_python(bare_venv)
    monkeypatch.setattr(factory, "SANDBOX_VENV", tmp_path / "absent")
    assert sandbox_python() == current_python()


@pytest.mark.skipif(not SANDBOX_VENV.exists(), reason="no .venv-sandbox (no Python 3.12 or later on this machine)")
def test_the_sandbox_venv_is_new_enough_and_imports_everything_the_code_inside_needs():
    runtime = venv_python(SANDBOX_VENV)
    assert tuple(int(n) for n in runtime.version.split(".")[:2]) >= (3, 12)
    # As inside: the product's packages on the path, nothing of the gateway's environment.
    walk = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(ROOT)!r})
for name in {INSIDE!r}:
    module = importlib.import_module(name)
    for found in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        if not found.name.endswith(".__main__"):  # those would start serving
            importlib.import_module(found.name)
import jsonschema, uvicorn  # imported lazily, by the conformance server's elicitation and HTTP transport
print("ok")
"""
    done = subprocess.run([str(SANDBOX_VENV / "bin" / "python"), "-I", "-c", walk], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
