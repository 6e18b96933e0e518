"""What a version's wheels would do besides being imported: a scan of the code it brings, dependencies included.

The tool's own wheel and each wheel of its dependency layer (`registry.dependencies`) are read
member by member, as stored (nothing is unpacked or run), for what a person approving a version
cannot see in its tool definitions:

- `dependency code` (failing: approving such a version takes --override):
  a `.pth` file with a line that starts with `import` (Python runs it at every interpreter start),
  a `sitecustomize` or `usercustomize` module (also run at start), a top-level module that shadows
  the standard library's, a file or a top-level name another distribution (of the layer, or of the
  sandbox runtime: `mcp`, `pydantic`...) already provides with other content (the install and its
  layer come first on the server's path, so theirs would win), a wheel whose files do not match its
  RECORD (or a dependency's wheel without one), a dependency's console script named like the tool's.
- `dependency notes` (advisory, reported for a person to read, never failing): native executables
  and shared objects outside the wheel's own declared package, `.pth` files of the two kinds
  setuptools itself writes, and for an npm server (`registry.onboard_npm`, whose wheel holds its
  node_modules) each package's `preinstall`/`install`/`postinstall` script (never run: npm installs
  with --ignore-scripts) and native `.node` addons.

Tuned for precision: the wheels of popular packages (httpx, anyio, pydantic's, charset-normalizer's
mypyc module) give no failing finding.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import io
import json
import re
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from registry.artifacts import ArtifactError, check_wheel, stream_member, wheel_metadata

CODE_CHECK = "dependency code"
NOTES_CHECK = "dependency notes"
MAX_FINDINGS = 50
"""Per check: a wheel with thousands of unlisted files says so in one more line, not thousands."""
MAX_TEXT_BYTES = 2**20
"""RECORD, top_level.txt, .pth files and package.json files read whole (larger: not read)."""
NATIVE_MAGIC = (b"\x7fELF", b"MZ", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
NATIVE_SUFFIXES = (".so", ".dylib", ".dll", ".pyd", ".exe", ".node")
STARTUP_MODULES = frozenset({"sitecustomize", "usercustomize"})
HASHES = frozenset({"sha256", "sha384", "sha512"})
"""What RECORD may use (the wheel specification: sha256 or stronger)."""
# The .pth files setuptools writes, which run only its own switch: reported, never failing.
SETUPTOOLS_PTH = (
    re.compile(r"import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os\.environ\.get\(var, '(local|stdlib)'\) == 'local'; "
               r"enabled and __import__\('_distutils_hack'\)\.add_shim\(\); ?"),
    re.compile(r"import sys, types, os;.*has_mfs = sys\.version_info > \(3, 5\);.*"),  # a -nspkg.pth (namespace packages)
)
INSTALL_SCRIPTS = ("preinstall", "install", "postinstall")
NPM_APP = "mcpfleet_npm_launcher/app/"


@dataclass
class _Wheel:
    """One wheel as it would be installed: its files (path in the install -> sha256) and top-level names."""

    label: str
    dist: str
    files: dict[str, str] = field(default_factory=dict)
    tops: dict[str, str] = field(default_factory=dict)
    """Top-level import name -> "module", "package" or "namespace"."""


@dataclass
class _Report:
    code: list[dict[str, str]] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)

    def fail(self, where: str, path: str, message: str) -> None:
        self.code.append({"check": CODE_CHECK, "tool": where, "path": path, "message": message})

    def note(self, where: str, path: str, message: str) -> None:
        self.notes.append({"check": NOTES_CHECK, "tool": where, "path": path, "message": message})


def code_checks(tool_wheel: Path, command: str, layer: list[dict[str, Any]], wheel_path: Callable[[str], Path],
                runtime_site: Sequence[Path], *, npm: bool = False) -> list[dict[str, Any]]:
    """Validation's two checks for the tool's wheel and its layer (the lock: name, version, sha256
    of each wheel; `wheel_path` finds one by digest). `runtime_site`: the sandbox runtime's
    site-packages, whose distributions a wheel must not shadow. Blocking: run it in a thread."""
    report = _Report()
    wheels = [_read(tool_wheel, "the tool's wheel", own=True, report=report, npm=npm)]
    for locked in layer:
        label = f"{locked['name']} {locked['version']}"
        path = wheel_path(locked["sha256"])
        wheels.append(_read(path, label, own=False, report=report, npm=False))
        _scripts(path, label, command, report)
    _collisions(wheels, _runtime_files(runtime_site), report)
    code, notes = _capped(report.code), _capped(report.notes)
    count = len(wheels)
    return [
        {"check": CODE_CHECK, "ok": not code, "findings": code,
         "detail": f"{len(report.code)} finding(s) in {count} wheel(s)" if code else f"{count} wheel(s) scanned: nothing found"},
        {"check": NOTES_CHECK, "ok": True, "advisory": True, "findings": notes,
         "detail": f"{len(report.notes)} to read (advisory: never fails validation)" if notes else "nothing to report"},
    ]


def _capped(findings: list[dict[str, str]]) -> list[dict[str, str]]:
    if len(findings) <= MAX_FINDINGS:
        return findings
    more = {**findings[0], "path": "", "message": f"and {len(findings) - MAX_FINDINGS} more finding(s) of this check"}
    return [*findings[:MAX_FINDINGS], more]


def _installed_path(member: str) -> str | None:
    """Where a member lands in an install (`registry.artifacts.install_wheel`); None: nowhere."""
    parts = member.split("/")
    if parts[0].endswith(".data"):
        return "/".join(parts[2:]) if len(parts) >= 3 and parts[1] in ("purelib", "platlib") else None
    return None if parts[0].endswith(".dist-info") else member


def _read(path: Path, label: str, *, own: bool, report: _Report, npm: bool) -> _Wheel:
    """The wheel's files, hashed as stored, with what is wrong or worth reading in it reported."""
    try:
        members = [m for m in check_wheel(path) if not m.is_dir()]
        names = {m.filename for m in members}
        dist_info = sorted({n.split("/", 1)[0] for n in names if n.split("/", 1)[0].endswith(".dist-info")})
        base = dist_info[0] if len(dist_info) == 1 else "?"
        digests: dict[str, dict[str, str]] = {}
        heads: dict[str, bytes] = {}
        texts: dict[str, str] = {}
        with zipfile.ZipFile(path) as archive:
            record = next((m for m in members if m.filename == f"{base}/RECORD" and m.file_size <= MAX_TEXT_BYTES), None)
            if record is not None:
                texts[record.filename] = _text(archive, record)
            used = {ln.split(",")[-2].partition("=")[0] for ln in texts.get(f"{base}/RECORD", "").splitlines() if ln.count(",") >= 2}
            algorithms = {"sha256"} | (used & HASHES)  # what RECORD uses, and sha256 to compare files by
            for member in members:
                digests[member.filename], heads[member.filename] = _digest(archive, member, algorithms)
                installed = _installed_path(member.filename)
                wanted = (installed is not None and "/" not in installed and installed.endswith(".pth")) \
                    or member.filename == f"{base}/top_level.txt" or (npm and _is_package_json(member))
                if wanted and member.file_size <= MAX_TEXT_BYTES:
                    texts[member.filename] = _text(archive, member)
    except (ArtifactError, zipfile.BadZipFile, OSError) as exc:
        report.fail(label, "", f"the wheel cannot be read: {exc}")
        return _Wheel(label, "")
    wheel = _Wheel(label, _dist_of(base))
    for name, digest in digests.items():
        installed = _installed_path(name)
        if installed is not None:
            wheel.files[installed] = digest["sha256"]
    if f"{base}/RECORD" in texts:
        _check_record(texts[f"{base}/RECORD"], f"{base}/RECORD", digests, label, report)
    elif not own:
        report.fail(label, "", "the wheel has no RECORD: what it holds cannot be checked against what it lists")
    _startup_code(wheel, {_installed_path(m) or m: t for m, t in texts.items() if m.endswith(".pth")}, report)
    _native(wheel, heads, texts.get(f"{base}/top_level.txt", "").split(), report, npm=npm)
    if npm:
        _npm_scripts({m: t for m, t in texts.items() if m.endswith("/package.json")}, names, report)
    return wheel


def _dist_of(dist_info: str) -> str:
    return canonicalize_name(dist_info.rsplit(".dist-info", 1)[0].split("-")[0]) if dist_info != "?" else ""


def _digest(archive: zipfile.ZipFile, member: zipfile.ZipInfo, algorithms: set[str]) -> tuple[dict[str, str], bytes]:
    """The member's RECORD-style hashes (by `algorithms`) and its first bytes."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    head = bytearray()

    def sink(block: bytes) -> None:
        if len(head) < 8:
            head.extend(block[: 8 - len(head)])
        for hasher in hashers.values():
            hasher.update(block)

    stream_member(archive, member, sink)
    return {name: base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode() for name, h in hashers.items()}, bytes(head)


def _text(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> str:
    blocks: list[bytes] = []
    stream_member(archive, member, blocks.append)
    return b"".join(blocks).decode(errors="replace")


def _check_record(text: str, record: str, digests: dict[str, dict[str, str]], label: str, report: _Report) -> None:
    """Each member listed in RECORD with the hash of its bytes; each RECORD line a member."""
    listed: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text)):
        if row and row[0]:
            listed[row[0]] = row[1] if len(row) > 1 else ""
    unsigned = {record, f"{record}.jws", f"{record}.p7s"}
    for member, digest in sorted(digests.items()):
        if member in unsigned:
            continue
        if member not in listed:
            report.fail(label, member, "the file is in the wheel but not in its RECORD")
            continue
        algorithm, _, expected = listed[member].partition("=")
        if algorithm not in HASHES:
            report.fail(label, member, f"its RECORD line gives no sha256 (or stronger) hash: {listed[member]!r}")
        elif digest.get(algorithm) != expected:
            report.fail(label, member, "the file does not match the hash its RECORD gives (changed after the wheel was built)")
    for missing in sorted(set(listed) - set(digests) - unsigned):
        if not missing.endswith("/"):
            report.fail(label, missing, "RECORD lists a file the wheel does not hold")


def _top(path: str, files: Container[str]) -> tuple[str, str] | None:
    """(import name, kind) a file of an install gives at top level; None for what is not importable."""
    head, sep, _rest = path.partition("/")
    if sep:
        if not head.isidentifier():
            return None
        return head, "package" if f"{head}/__init__.py" in files else "namespace"
    name = head.split(".", 1)[0]
    if name.isidentifier() and (head.endswith(".py") or head.endswith((".so", ".pyd"))):
        return name, "module"
    return None


def _startup_code(wheel: _Wheel, pth: dict[str, str], report: _Report) -> None:
    for path, text in sorted(pth.items()):
        lines = [ln.strip() for ln in text.splitlines() if ln.startswith(("import ", "import\t"))]
        if not lines:
            continue
        if all(any(p.fullmatch(ln) for p in SETUPTOOLS_PTH) for ln in lines):
            report.note(wheel.label, path, "a .pth file setuptools writes (it runs its own switch at interpreter start)")
        else:
            report.fail(wheel.label, path, f"a .pth file that runs code at every interpreter start: {lines[0][:160]!r}")
    for path in wheel.files:
        top = _top(path, wheel.files)
        if top is not None and wheel.tops.get(top[0]) != "package":
            wheel.tops[top[0]] = top[1]
    for name, kind in sorted(wheel.tops.items()):
        if name in STARTUP_MODULES:
            report.fail(wheel.label, name, f"a {name} module: Python imports it at every interpreter start")
        elif name in sys.stdlib_module_names and name != "test":  # a stray test/ dir shadows nothing anyone imports
            report.fail(wheel.label, name, f"a top-level {kind} {name!r} shadows the standard library's module of that name")


def _native(wheel: _Wheel, heads: dict[str, bytes], declared: list[str], report: _Report, *, npm: bool) -> None:
    """Native code outside the wheel's own package (top_level.txt, or the names like its distribution's)."""
    own = {canonicalize_name(n).replace("-", "_") for n in declared} | {wheel.dist.replace("-", "_")}
    for member, head in sorted(heads.items()):
        if not head.startswith(NATIVE_MAGIC) and not member.endswith(NATIVE_SUFFIXES):
            continue
        if npm and member.startswith(NPM_APP):
            kind = "a native Node addon" if member.endswith(".node") else "a native executable or library"
            report.note(wheel.label, member.removeprefix(NPM_APP), f"{kind} in the npm install")
            continue
        installed = _installed_path(member)
        top = canonicalize_name((installed or "").split("/", 1)[0].split(".", 1)[0]).replace("-", "_")
        if installed is None or top not in own:
            where = "outside the install (in .data)" if installed is None else f"outside its own package ({', '.join(sorted(own))})"
            report.note(wheel.label, member, f"native code {where}")


def _is_package_json(member: zipfile.ZipInfo) -> bool:
    """A package's own package.json in the packed npm install (node_modules/[@scope/]name/package.json)."""
    parts = member.filename.split("/")
    return (member.filename.startswith(NPM_APP) and parts[-1] == "package.json" and len(parts) >= 5
            and (parts[-3] == "node_modules" or (parts[-4] == "node_modules" and parts[-3].startswith("@"))))


def _npm_scripts(package_jsons: dict[str, str], members: set[str], report: _Report) -> None:
    for path, text in sorted(package_jsons.items()):
        root = path.rsplit("/", 1)[0]
        try:
            package = json.loads(text)
        except ValueError:
            continue
        if not isinstance(package, dict):
            continue
        where = f"{package.get('name') or root.rpartition('node_modules/')[2]} {package.get('version') or ''}".strip()
        scripts = package["scripts"] if isinstance(package.get("scripts"), dict) else {}
        for hook in INSTALL_SCRIPTS:
            if isinstance(scripts.get(hook), str):
                report.note(where, f"package.json scripts.{hook}",
                            f"an install script (not run: npm installs with --ignore-scripts): {scripts[hook][:160]!r}")
        if f"{root}/binding.gyp" in members and not any(h in scripts for h in INSTALL_SCRIPTS):
            report.note(where, "binding.gyp", "npm would build a native addon at install (node-gyp; not run here)")


def _scripts(path: Path, label: str, command: str, report: _Report) -> None:
    try:
        _metadata, scripts = wheel_metadata(path)
    except ArtifactError as exc:
        report.fail(label, "", f"its metadata cannot be read: {exc}")
        return
    if command in scripts:
        report.fail(label, "entry_points.txt", f"a console script {command!r}, the tool's own command's name ({scripts[command]})")


def _runtime_files(site: Iterable[Path]) -> dict[str, tuple[str, str]]:
    """The runtime's installed files (path -> (distribution, RECORD's sha256 value)), from each RECORD:
    read once per state of its site-packages (a directory's mtime changes as a distribution comes or goes)."""
    dirs = tuple(Path(d) for d in site)
    return _read_runtime(dirs, tuple(d.stat().st_mtime_ns if d.is_dir() else 0 for d in dirs))


@functools.lru_cache(maxsize=2)
def _read_runtime(site: tuple[Path, ...], _stamps: tuple[int, ...]) -> dict[str, tuple[str, str]]:
    files: dict[str, tuple[str, str]] = {}
    for directory in site:
        for record in sorted(Path(directory).glob("*.dist-info/RECORD")):
            dist = _dist_of(record.parent.name)
            try:
                rows = list(csv.reader(io.StringIO(record.read_text(errors="replace"))))
            except OSError:
                continue
            for row in rows:
                if row and row[0] and ".." not in row[0].split("/") and _installed_path(row[0]) == row[0]:
                    files.setdefault(row[0], (dist, row[1].partition("=")[2] if len(row) > 1 and row[1].startswith("sha256=") else ""))
    return files


def _collisions(wheels: list[_Wheel], runtime: dict[str, tuple[str, str]], report: _Report) -> None:
    """A file two distributions both provide, with other content; a top-level module of one where
    another has a package or module: whichever comes first on the server's path wins."""
    owners: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # path -> [(dist, sha256, where)]
    tops: dict[str, tuple[str, str, str]] = {}  # name -> (dist, kind, where)
    for path, (dist, digest) in runtime.items():
        owners[path].append((dist, digest, "the sandbox runtime"))
        top = _top(path, runtime)
        if top is not None and tops.get(top[0], ("", "", ""))[1] != "package":
            tops[top[0]] = (dist, top[1], "the sandbox runtime")
    for wheel in wheels:
        for path, digest in sorted(wheel.files.items()):
            clash = next(((d, w) for d, other, w in owners[path] if d != wheel.dist and other != digest), None)
            if clash is not None:
                report.fail(wheel.label, path, f"the file is also {clash[0]}'s (in {clash[1]}), with other content: one would replace the other")
            owners[path].append((wheel.dist, digest, wheel.label))
        for name, kind in sorted(wheel.tops.items()):
            dist, other_kind, where = tops.get(name, (wheel.dist, "", ""))
            if dist != wheel.dist and "module" in (kind, other_kind) and other_kind:
                report.fail(wheel.label, name, f"a top-level {kind} {name!r} where {dist} (in {where}) has a {other_kind} of that name: "
                                               "one would shadow the other")
            tops.setdefault(name, (wheel.dist, kind, wheel.label))
