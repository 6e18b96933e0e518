"""Published wheels: stored by digest, unpacked once, linked into the sandboxes that run them.

A wheel lives at `<home>/registry/artifacts/<sha256>.whl` and is installed (without
dependencies: those are resolved at publish into a layer of their own, `registry.dependencies`,
since a sandbox has no network to fetch anything) into `<home>/registry/installed/<sha256>/`, owned by root and
read-only to everyone else. A sandbox sees only the installs of the servers its user
may run: they are hard-linked into its own `tools` dir, bound read-only at /opt/tools.

A wheel is a zip, and a zip can be a bomb: a few KiB that unpack to GiBs. Before anything is
read or unpacked, `check_wheel` holds the central directory to the limits below (members, their
sizes, their compression ratio), and every read streams in blocks that count what the member
really yields, since a central directory may lie about sizes: a member that yields more than it
declares is refused, whatever it says.
"""

from __future__ import annotations

import configparser
import copy
import errno
import hashlib
import io
import os
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from email.parser import HeaderParser
from pathlib import Path

from core.optional import require
from sandbox.bundle import TOOLS as TOOLS_INSIDE
from sandbox.servers import ServerSpec

MAX_MEMBERS = 10_000
"""Files in one wheel (each costs memory to list before anything is read)."""
MAX_DIRECTORY_BYTES = 4 * 2**20
"""The zip's central directory, which zipfile reads and parses whole."""
MAX_MEMBER_BYTES = 64 * 2**20
"""What one member may unpack to."""
MAX_UNPACKED_BYTES = 256 * 2**20
"""What a whole wheel may unpack to."""
MAX_RATIO = 100
"""How many times its compressed size a member over RATIO_FLOOR_BYTES may unpack to (source
code compresses 3-10 times; a run of zeros, a thousand)."""
RATIO_FLOOR_BYTES = 2**20
MAX_METADATA_BYTES = 2**20
"""METADATA and entry_points.txt, which are read into memory whole."""
READ_BLOCK = 64 * 1024


class ArtifactError(ValueError):
    """A wheel that cannot be stored, installed or run; the message says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class S3Artifacts:
    """Wheels in an S3-compatible store (AWS, MinIO, Ceph…), keyed by digest, at `s3://bucket/prefix`.

    The endpoint and credentials come from the usual AWS variables (`AWS_ENDPOINT_URL`,
    `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), as any S3 client reads them.
    """

    def __init__(self, url: str):
        boto3 = require("boto3", extra="s3", feature="MCPFLEET_ARTIFACTS_S3_URL (wheels in an S3-compatible store)")

        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ArtifactError(f"MCPFLEET_ARTIFACTS_S3_URL must read s3://bucket[/prefix], not {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3")

    def _key(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256}.whl" if self.prefix else f"{sha256}.whl"

    def put(self, sha256: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(sha256), Body=data, ContentType="application/zip")

    def get(self, sha256: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"].read()
        except Exception as exc:  # botocore's errors: missing key, bucket, credentials, endpoint
            raise ArtifactError(f"wheel {sha256} could not be fetched from s3://{self.bucket}: {exc}") from None


class ArtifactStore:
    def __init__(self, home: Path, remote: S3Artifacts | None = None):
        self.root = Path(home) / "registry"
        self.artifacts = self.root / "artifacts"
        self.installed = self.root / "installed"
        self.remote = remote

    def wheel_path(self, sha256: str) -> Path:
        """The wheel on this machine: fetched from the remote store if need be, and checked against
        its digest, so a changed object in the store is never run."""
        path = self.artifacts / f"{sha256}.whl"
        if not path.exists() and self.remote is not None:
            data = self.remote.get(sha256)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ArtifactError(f"the stored wheel {sha256} does not match its digest; refusing it")
            self._keep(sha256, data)
        return path

    def install_path(self, sha256: str) -> Path:
        return self.installed / sha256

    def store(self, data: bytes) -> str:
        """Keep a wheel under its digest (idempotent); returns the digest."""
        sha256 = hashlib.sha256(data).hexdigest()
        if self.remote is not None:
            self.remote.put(sha256, data)
        self._keep(sha256, data)
        return sha256

    def _keep(self, sha256: str, data: bytes) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        target = self.artifacts / f"{sha256}.whl"
        if not target.exists():
            partial = target.with_suffix(".partial")
            partial.write_bytes(data)
            os.chmod(partial, 0o644)
            partial.rename(target)

    def install(self, sha256: str) -> Path:
        """The wheel unpacked, once; a half-done install is never seen (built aside, then renamed)."""
        target = self.install_path(sha256)
        if target.is_dir():
            return target
        self.installed.mkdir(parents=True, exist_ok=True)
        os.chmod(self.installed, 0o755)
        staging = self.installed / f".{sha256}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        install_wheel(self.wheel_path(sha256), staging)
        staging.rename(target)
        return target

    def install_layer(self, digest: str, wheels: list[str]) -> Path:
        """A version's dependency layer (`registry.dependencies`): each of its wheels, checked by
        digest, unpacked into one directory, once; built aside, then renamed."""
        target = self.install_path(digest)
        if target.is_dir():
            return target
        self.installed.mkdir(parents=True, exist_ok=True)
        staging = self.installed / f".{digest}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for sha256 in wheels:
            install_wheel(self.wheel_path(sha256), staging, merge=True)
        staging.rename(target)
        return target

    def link_into(self, sandbox_tools: Path, digests: set[str], layers: dict[str, list[str]] | None = None) -> None:
        """Make `sandbox_tools` hold exactly these installs (hard links: no copy, and the files
        stay root's and read-only; the dir is bound read-only anyway). `layers`: dependency layers
        among `digests`, by digest -> the digests of their wheels."""
        layers = layers or {}
        sandbox_tools.mkdir(mode=0o755, exist_ok=True)
        present = {p.name for p in sandbox_tools.iterdir()}
        for stale in present - digests:
            shutil.rmtree(sandbox_tools / stale, ignore_errors=True)
        for sha256 in digests - present:
            source = self.install_layer(sha256, layers[sha256]) if sha256 in layers else self.install(sha256)
            staging = sandbox_tools / f".{sha256}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging, copy_function=_link_or_copy, symlinks=True)
            staging.rename(sandbox_tools / sha256)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the two are on one mount, else a copy: the sandboxes dir is a mount of its
    own (`sandbox.mounts.share`, or a filesystem an operator put there), and link(2) never crosses
    mounts, even two binds of one filesystem."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(source, target)


def _check_end_record(wheel: Path | bytes) -> None:
    """The zip's end record, read before zipfile lists (and allocates) the whole central directory:
    the entries it announces, and the directory's size, which is what zipfile actually walks."""
    if isinstance(wheel, bytes):
        tail = wheel[-(65536 + 22) :]
    else:
        with open(wheel, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (65536 + 22)))
            tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise ArtifactError("the upload is not a wheel (not a zip archive)")
    entries, directory_bytes = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF or (at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07"):
        raise ArtifactError("the wheel is a zip64 archive: more members, or larger ones, than a wheel is allowed")
    if entries > MAX_MEMBERS:
        raise ArtifactError(f"the wheel has {entries} members; at most {MAX_MEMBERS} are taken")
    if directory_bytes > MAX_DIRECTORY_BYTES:
        raise ArtifactError(f"the wheel's list of members is {directory_bytes} bytes; at most {MAX_DIRECTORY_BYTES} are taken")


def check_wheel(wheel: Path | bytes) -> list[zipfile.ZipInfo]:
    """The wheel's members, if its central directory keeps within the limits and names no path
    outside itself; ArtifactError naming the limit otherwise. Reads the directory only."""
    _check_end_record(wheel)
    try:
        with zipfile.ZipFile(io.BytesIO(wheel) if isinstance(wheel, bytes) else wheel) as archive:
            members = archive.infolist()
    except zipfile.BadZipFile:
        raise ArtifactError("the upload is not a wheel (not a zip archive)") from None
    if len(members) > MAX_MEMBERS:
        raise ArtifactError(f"the wheel has {len(members)} members; at most {MAX_MEMBERS} are taken")
    total = 0
    for member in members:
        _inside(member.filename)
        if member.file_size > MAX_MEMBER_BYTES:
            raise ArtifactError(
                f"the wheel's {member.filename!r} unpacks to {member.file_size} bytes; at most {MAX_MEMBER_BYTES} are taken per member"
            )
        if member.file_size > RATIO_FLOOR_BYTES and member.file_size > MAX_RATIO * max(member.compress_size, 1):
            raise ArtifactError(
                f"the wheel's {member.filename!r} unpacks to {member.file_size // max(member.compress_size, 1)} times its "
                f"compressed size; at most {MAX_RATIO} times is taken (compression ratio limit)"
            )
        if member.filename.endswith((".dist-info/METADATA", ".dist-info/entry_points.txt")) and member.file_size > MAX_METADATA_BYTES:
            raise ArtifactError(
                f"the wheel's {member.filename!r} is {member.file_size} bytes; at most {MAX_METADATA_BYTES} are taken for it"
            )
        total += member.file_size
        if total > MAX_UNPACKED_BYTES:
            raise ArtifactError(f"the wheel unpacks to more than {MAX_UNPACKED_BYTES} bytes (the limit on its unpacked size)")
    return members


def _inside(filename: str) -> None:
    parts = Path(filename).parts
    if filename.startswith("/") or ".." in parts:
        raise ArtifactError(f"the wheel names a path outside itself: {filename!r}")


def stream_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, sink: Callable[[bytes], object]) -> int:
    """Hand the member's bytes to `sink` block by block; returns how many there were. A member that
    yields more than its header declares is refused as soon as it does (zipfile alone would stop at
    the declared size without saying so, or decompress the rest in one go), and so is one whose
    checksum is wrong."""
    probe = copy.copy(member)
    probe.file_size = member.file_size + 1  # let zipfile yield one byte more than declared, to see it
    del probe.CRC  # checked here, once the size is: zipfile would check it at the declared size + 1
    seen, crc = 0, 0
    with archive.open(probe) as source:
        while block := source.read(READ_BLOCK):
            seen += len(block)
            if seen > member.file_size:
                raise ArtifactError(
                    f"the wheel's {member.filename!r} unpacks to more than the {member.file_size} bytes its header declares"
                )
            crc = zlib.crc32(block, crc)
            sink(block)
    if seen != member.file_size or crc != member.CRC:
        raise ArtifactError(f"the wheel's {member.filename!r} is damaged: its size or checksum is not what its header declares")
    return seen


def verify_wheel(wheel: Path | bytes) -> None:
    """`check_wheel`, then every member read through (to nowhere): a lying header or a bad checksum
    is refused here, at publish, rather than when a sandbox first needs the wheel."""
    members = check_wheel(wheel)
    try:
        with zipfile.ZipFile(io.BytesIO(wheel) if isinstance(wheel, bytes) else wheel) as archive:
            for member in members:
                if not member.is_dir():
                    stream_member(archive, member, lambda block: None)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise ArtifactError(f"the wheel is damaged or uses what wheels do not ({exc})") from None


def install_wheel(wheel: Path, target: Path, *, merge: bool = False) -> None:
    """Unpack a wheel into `target` as an installer would for a pure-Python package, without its
    dependencies; `.data/purelib|platlib` is merged in, the rest of `.data` (scripts, headers) left out.
    A member naming a path outside `target` is refused, and so is a wheel over the limits (checked
    before anything is written, and again while writing). `merge`: into an existing `target` (a
    dependency layer, several wheels in one directory); on failure the caller removes it."""
    members = check_wheel(wheel)
    target.mkdir(parents=True, exist_ok=merge)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in members:
                if member.is_dir():
                    continue
                parts = Path(member.filename).parts
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                destination = target.joinpath(*parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with open(destination, "wb") as out:
                    stream_member(archive, member, out.write)
    except zipfile.BadZipFile as exc:
        if not merge:
            shutil.rmtree(target, ignore_errors=True)
        raise ArtifactError(f"the wheel is damaged ({exc})") from None
    except ArtifactError:
        if not merge:
            shutil.rmtree(target, ignore_errors=True)
        raise
    for directory, _dirs, files in os.walk(target):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def _read_small(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> str:
    if member.file_size > MAX_METADATA_BYTES:  # check_wheel refuses these; a direct caller may not have
        raise ArtifactError(f"the wheel's {member.filename!r} is {member.file_size} bytes; at most {MAX_METADATA_BYTES} are taken for it")
    blocks: list[bytes] = []
    stream_member(archive, member, blocks.append)
    try:
        return b"".join(blocks).decode()
    except UnicodeDecodeError:
        raise ArtifactError(f"the wheel's {member.filename!r} is not UTF-8") from None


def wheel_metadata(wheel: Path) -> tuple[dict[str, str | list[str]], dict[str, str]]:
    """(the METADATA headers, the console scripts) of a wheel, read without installing it."""
    members = {m.filename: m for m in check_wheel(wheel)}
    dist_info = {n.split("/", 1)[0] for n in members if n.split("/", 1)[0].endswith(".dist-info")}
    if len(dist_info) != 1:
        raise ArtifactError("the wheel must hold exactly one .dist-info directory")
    base = dist_info.pop()
    if f"{base}/METADATA" not in members:
        raise ArtifactError(f"the wheel lacks {base}/METADATA")
    try:
        with zipfile.ZipFile(wheel) as archive:
            metadata_text = _read_small(archive, members[f"{base}/METADATA"])
            entry_points = _read_small(archive, members[f"{base}/entry_points.txt"]) if f"{base}/entry_points.txt" in members else ""
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"the wheel is damaged ({exc})") from None
    headers = HeaderParser().parsestr(metadata_text)
    metadata: dict[str, str | list[str]] = {key: headers[key] for key in ("Name", "Version", "Summary") if headers[key]}
    metadata["Requires-Dist"] = headers.get_all("Requires-Dist") or []
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # script names are case-sensitive
    try:
        parser.read_string(entry_points)
    except configparser.Error as exc:
        raise ArtifactError(f"the wheel's entry_points.txt is not readable: {exc}") from None
    scripts = dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}
    return metadata, scripts


def server_spec(prefix: str, sha256: str, entry_point: str, secrets: tuple[str, ...] = (), server: str = "",
                *, egress: tuple[str, ...] = (), inference: bool = False, layer: str | None = None,
                layer_wheels: tuple[str, ...] = ()) -> ServerSpec:
    """How a sandbox runs a published server: its console script's callable, from its install, with
    its dependency layer (`registry.dependencies`), if it has one, on its path after it."""
    module, _, attr = entry_point.partition(":")
    module, attr = module.strip(), attr.strip()
    if not module.replace(".", "").replace("_", "").isalnum() or not attr.replace(".", "").replace("_", "").isalnum():
        raise ArtifactError(f"console script {entry_point!r} is not of the form module:function")
    head, _, rest = attr.partition(".")
    path = f"{TOOLS_INSIDE}/{sha256}"
    # The install goes first on the path, then its layer: what they ship wins over the runtime's, for
    # this server alone (pip resolved the layer against the runtime: it holds only what the runtime
    # lacks, or has in a version the tool does not take).
    paths = [path, f"{TOOLS_INSIDE}/{layer}"] if layer else [path]
    code = f"import sys; sys.path[0:0] = {paths!r}; from {module} import {head} as entry; sys.exit(entry{'.' + rest if rest else ''}())"
    # The names it declares, so `mcpfleet_sdk.secret()` tells "not declared" from "not set".
    env = {"MCPFLEET_DECLARED_SECRETS": ",".join(secrets)}
    return ServerSpec(
        prefix, ("python", "-c", code), env=env, revision=sha256, server=server, secret_names=tuple(secrets), egress=egress,
        layer=layer or "", layer_wheels=tuple(layer_wheels) if layer else (), inference=inference,
    )
