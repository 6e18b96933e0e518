"""`mcpfleet dev DIR`: the project's wheel, run alone in a real gVisor sandbox as the registry's trial runs it.

Prints the tools as users will see them (`<prefix>__<tool>`, a tab, the description; one per
line), then the start time and the sandbox's memory, then the result of `--call` when asked;
progress lines (building, starting) go to stderr.
Exit status 1, with the reason on stderr, when the project is invalid, the wheel does not
build, the server does not start, or the call fails.

Declared secrets are given to the server from `MCPFLEET_TEST_SECRET_<NAME>`, as in tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from mcpfleet_sdk import project as projects
from mcpfleet_sdk.build import BuildError, build_wheel, check_wheel
from mcpfleet_sdk.local import TEST_SECRET_PREFIX
from mcpfleet_sdk.secrets import DECLARED_ENV


def dev(
    directory: Path,
    *,
    call: tuple[str, dict[str, Any]] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    manifest = projects.load_or_report(directory, err)
    if manifest is None:
        return 1
    env = {DECLARED_ENV: ",".join(manifest.fleet.secrets)}
    for name in manifest.fleet.secrets:
        value = os.environ.get(TEST_SECRET_PREFIX + name)
        if value:
            env[name] = value
        else:
            print(f"mcpfleet: warning: the declared secret {name} is not given (set {TEST_SECRET_PREFIX}{name})", file=err)

    with tempfile.TemporaryDirectory(prefix="mcpfleet-dev-") as scratch:
        # Progress on stderr (stdout is the tools, for scripts): the whole takes some seconds.
        try:
            print(f"building the wheel of {manifest.name} {manifest.version}", file=err, flush=True)
            wheel = build_wheel(directory, Path(scratch) / "dist")
            check_wheel(wheel, manifest.package, manifest.version)
            print(f"built {wheel.name}; starting it in a gVisor sandbox", file=err, flush=True)
            result = asyncio.run(_trial(manifest, wheel, Path(scratch) / "install", env, call))
        except BuildError as exc:
            print(f"mcpfleet: {exc}", file=err)
            return 1

    if result.error is not None:
        print(f"mcpfleet: {manifest.name} {manifest.version}: {result.error}", file=err)
        return 1
    for tool in result.tools:
        description = " ".join(str(tool.get("description") or "").split())
        print(f"{manifest.prefix}__{tool['name']}\t{description}", file=out)
    memory = f"{result.memory_bytes / 2**20:.1f} MiB" if result.memory_bytes is not None else "unknown"
    print(f"started in {result.start_ms} ms, memory {memory}", file=out)
    if call is None:
        return 0
    name, arguments = call
    print(f"{manifest.prefix}__{name}({json.dumps(arguments, ensure_ascii=False)}):", file=out)
    return _print_call_result(result.call_result or {}, out, err)


async def _trial(manifest: Any, wheel: Path, install: Path, env: dict[str, str], call: tuple[str, dict[str, Any]] | None) -> Any:
    # The fleet's own parts, imported only here: `mcpfleet dev` runs on a machine with the fleet installed.
    from dataclasses import replace

    from core.settings import load_settings
    from registry.artifacts import ArtifactError, ArtifactStore, install_wheel, server_spec, sha256_of, wheel_metadata
    from registry.dependencies import dependency_check
    from registry.trial import TrialResult, trial_run
    from sandbox.factory import sandbox_backend, sandbox_python

    python = sandbox_python()
    layers: dict[str, Path] = {}
    try:
        metadata, scripts = await asyncio.to_thread(wheel_metadata, wheel)
        if manifest.command not in scripts:
            raise ArtifactError(f"the wheel has no console script {manifest.command!r} (it has: {', '.join(scripts) or 'none'})")
        await asyncio.to_thread(install_wheel, wheel, install)
        # Its dependencies as the registry resolves them at publish, in a scratch store of their own.
        scratch = ArtifactStore(install.parent / "dependencies")
        deps = await asyncio.to_thread(dependency_check, list(metadata.get("Requires-Dist") or []), python, scratch.store)
        if not deps["ok"]:
            raise ArtifactError(f"its dependencies: {deps['detail']}")
        wheels = tuple(p["sha256"] for p in deps["packages"])
        if deps["layer_sha256"]:
            layers[deps["layer_sha256"]] = await asyncio.to_thread(scratch.install_layer, deps["layer_sha256"], list(wheels))
        spec = server_spec(manifest.prefix, await asyncio.to_thread(sha256_of, wheel), scripts[manifest.command],
                           layer=deps["layer_sha256"], layer_wheels=wheels)
    except ArtifactError as exc:
        return TrialResult(error=str(exc))
    settings = load_settings()
    backend = sandbox_backend(settings, python)
    return await trial_run(backend, settings.home, replace(spec, env={**spec.env, **env}), install, call=call, layers=layers)


def _print_call_result(result: dict[str, Any], out: TextIO, err: TextIO) -> int:
    """What the model would read: the text blocks, else the structured content; errors go to stderr."""
    if "error" in result and "content" not in result:  # the call failed at the protocol level
        error = result["error"]
        print(f"mcpfleet: the call failed: {error.get('message', error)}", file=err)
        return 1
    texts = [block.get("text", "") for block in result.get("content") or [] if block.get("type") == "text"]
    if texts:
        shown = "\n".join(texts)
    elif result.get("structuredContent") is not None:
        shown = json.dumps(result["structuredContent"], indent=2, ensure_ascii=False)
    else:
        shown = json.dumps(result.get("content") or [], indent=2, ensure_ascii=False)
    if result.get("isError"):
        print(f"mcpfleet: the tool returned an error:\n{shown}", file=err)
        return 1
    print(shown, file=out)
    return 0
