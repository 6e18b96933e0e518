"""The import contracts (pyproject.toml, checked by `make lint`) cover the whole sandbox package.

The contract that keeps the in-sandbox supervisor to the standard library, the mcp SDK and the
wire module names every other module of `sandbox` (import-linter cannot say "all but one"): a
module added to `sandbox/` without being added there would be importable by the supervisor.
"""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT

ALLOWED_INSIDE = {"sandbox.wire", "sandbox.supervisor"}


def test_the_supervisor_contract_forbids_every_other_sandbox_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c.get("source_modules") == ["sandbox.supervisor"]]
    forbidden = set(contract["forbidden_modules"])
    modules = {
        "sandbox." + (path.stem if path.is_file() else path.name)
        for path in (ROOT / "sandbox").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert modules - ALLOWED_INSIDE - forbidden == set(), "add these to the contract's forbidden_modules"
    assert forbidden & ALLOWED_INSIDE == set()
