"""The `workspace` server: read, write, list and delete files under the user's workspace."""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from mcp_servers.workspace.confine import OutsideWorkspace, Workspace

MAX_READ_BYTES = 4 * 1024 * 1024
# Below the gateway's default body limit (MCPFLEET_MAX_BODY_BYTES, 4 MiB), which must also carry the
# call's JSON envelope and escapes: a write the tool advertises fits through the gateway.
MAX_WRITE_BYTES = 3 * 1024 * 1024
MAX_LIST_ENTRIES = 1000
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once at import, while nothing else runs: os.umask can only be read by setting it
"""The supervisor starts servers with umask 007 in a sandbox, so that they share the workspace by group."""

RelativePath = Annotated[
    str,
    Field(description="Path relative to the workspace root, e.g. 'src/main.py'. Absolute paths and '..' are refused."),
]


class Entry(BaseModel):
    name: str
    type: Literal["file", "directory", "symlink", "other"]
    size: int | None = Field(default=None, description="Size in bytes (files only)")


class Listing(BaseModel):
    path: str = Field(description="The directory listed, relative to the workspace root")
    entries: list[Entry] = Field(description="Entries sorted by name")
    truncated: bool = Field(description=f"True when the directory has more than {MAX_LIST_ENTRIES} entries")


def create_server(root: str | os.PathLike[str]) -> MCPServer[Any]:
    workspace = Workspace(root)
    server: MCPServer[Any] = MCPServer(
        "workspace",
        version="0.1.0",
        instructions=(
            "Files in your workspace. Every path is relative to the workspace root; nothing outside it can be reached."
        ),
        log_level="WARNING",
    )

    def locate(path: str, **kwargs: bool) -> Path:
        try:
            return workspace.resolve(path, **kwargs)
        except OutsideWorkspace as exc:
            raise ToolError(str(exc)) from None

    @server.tool(
        description=(
            f"Read a UTF-8 text file from the workspace and return its content. "
            f"Files larger than {MAX_READ_BYTES // (1024 * 1024)} MiB are refused."
        ),
        annotations=ToolAnnotations(title="Read file", read_only_hint=True, open_world_hint=False),
        structured_output=False,
    )
    @_explaining_os_errors
    def read_file(path: RelativePath) -> str:
        real = locate(path)
        st = _stat(real, path)
        if stat.S_ISDIR(st.st_mode):
            raise ToolError(f"{path!r} is a directory; use list_dir to see what it contains")
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{path!r} is not a regular file")
        if st.st_size > MAX_READ_BYTES:
            raise ToolError(
                f"{path!r} is {st.st_size} bytes; read_file returns files of at most {MAX_READ_BYTES} bytes"
            )
        # O_NOFOLLOW: the name was checked above; a link swapped in since is not followed.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_READ_BYTES + 1)
        if len(data) > MAX_READ_BYTES:
            raise ToolError(f"{path!r} grew past {MAX_READ_BYTES} bytes while being read")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not UTF-8 text ({len(data)} bytes); read_file returns text only") from None

    @server.tool(
        description=(
            "Write text to a file in the workspace, replacing it if it exists and creating missing parent "
            f"directories. Content is stored as UTF-8; at most {MAX_WRITE_BYTES // (1024 * 1024)} MiB "
            "(write a larger file in parts and join them)."
        ),
        annotations=ToolAnnotations(
            title="Write file", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
        structured_output=False,
    )
    @_explaining_os_errors
    def write_file(path: RelativePath, content: Annotated[str, Field(description="The full new content")]) -> str:
        data = content.encode("utf-8")
        if len(data) > MAX_WRITE_BYTES:
            raise ToolError(f"content is {len(data)} bytes; write_file stores at most {MAX_WRITE_BYTES} bytes")
        real = locate(path)
        if real == workspace.root or real.is_dir():
            raise ToolError(f"{path!r} is a directory")
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ToolError(f"{path!r} cannot be created: one of its parents is a file, not a directory") from None
        _write_atomically(real, data)
        return f"Wrote {len(data)} bytes to {path}"

    @server.tool(
        description=(
            "List a directory of the workspace: each entry's name, type (file, directory, symlink, other) "
            f"and, for files, size in bytes. The root is '.'. At most {MAX_LIST_ENTRIES} entries are returned."
        ),
        annotations=ToolAnnotations(title="List directory", read_only_hint=True, open_world_hint=False),
    )
    @_explaining_os_errors
    def list_dir(path: RelativePath = ".") -> Listing:
        real = locate(path)
        st = _stat(real, path)
        if not stat.S_ISDIR(st.st_mode):
            raise ToolError(f"{path!r} is not a directory")
        entries: list[Entry] = []
        with os.scandir(real) as it:
            names = sorted(it, key=lambda e: e.name)
        for item in names[:MAX_LIST_ENTRIES]:
            entries.append(_entry(item))
        return Listing(path=workspace.relative(real), entries=entries, truncated=len(names) > MAX_LIST_ENTRIES)

    @server.tool(
        description=(
            "Delete a file, a symbolic link (the link itself, not what it points to) or a directory from the "
            "workspace. A directory that is not empty is deleted only with recursive=true."
        ),
        annotations=ToolAnnotations(
            title="Delete", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
        structured_output=False,
    )
    @_explaining_os_errors
    def delete(
        path: RelativePath,
        recursive: Annotated[bool, Field(description="Also delete a directory's contents")] = False,
    ) -> str:
        real = locate(path, follow_last=False)
        if real == workspace.root:
            raise ToolError("the workspace root itself cannot be deleted")
        try:
            st = os.lstat(real)
        except FileNotFoundError:
            raise ToolError(f"{path!r} does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                shutil.rmtree(real)  # never follows symlinks: links inside are removed, not their targets
                return f"Deleted directory {path} and everything in it"
            try:
                os.rmdir(real)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise ToolError(f"{path!r} is a directory that is not empty; pass recursive=true") from None
                raise
            return f"Deleted empty directory {path}"
        os.unlink(real)
        return f"Deleted {path}"

    return server


_Tool = TypeVar("_Tool", bound=Callable[..., Any])


def _explaining_os_errors(tool: _Tool) -> _Tool:
    """Report what the file system said (permission denied, not a directory...) as the tool's error.

    The wrapper is a coroutine so the SDK runs the tool on the event loop instead of in a worker
    thread: each file operation is bounded (reads and writes are capped) and in a gVisor sandbox a
    thread hand-off costs more than the work itself."""

    @functools.wraps(tool)
    async def explained(**arguments: Any) -> Any:
        try:
            return tool(**arguments)
        except FileNotFoundError:
            raise ToolError(f"{arguments['path']!r} does not exist") from None
        except OSError as exc:
            raise ToolError(f"{arguments['path']!r}: {exc.strerror or exc}") from None

    return explained  # type: ignore[return-value]


def _stat(real: Path, asked: str) -> os.stat_result:
    try:
        return os.stat(real)
    except FileNotFoundError:
        raise ToolError(f"{asked!r} does not exist") from None


def _entry(item: os.DirEntry[str]) -> Entry:
    if item.is_symlink():
        return Entry(name=item.name, type="symlink")
    if item.is_dir(follow_symlinks=False):
        return Entry(name=item.name, type="directory")
    if item.is_file(follow_symlinks=False):
        return Entry(name=item.name, type="file", size=item.stat(follow_symlinks=False).st_size)
    return Entry(name=item.name, type="other")


def _write_atomically(real: Path, data: bytes) -> None:
    """Readers see the old content or the new, never half of it."""
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~UMASK  # as open() would: in a sandbox, group-writable for the other servers
    temp = real.with_name(f".{real.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, mode)
        os.replace(temp, real)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
