"""Keeping every path a caller names inside the workspace root.

Paths are relative to the root. Absolute paths and `..` are refused outright, before
touching the file system, so the answer does not depend on what happens to exist.
Symlinks inside the workspace are followed as long as they resolve to a place that
is still inside it; one that leads out is refused.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class OutsideWorkspace(ValueError):
    """The path names something that is not inside the workspace."""


class Workspace:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def resolve(self, path: str, *, follow_last: bool = True) -> Path:
        """The real location of `path`, which is guaranteed to be inside the root.

        With `follow_last=False` a symlink named as the last component is not
        followed (the path of the link itself is returned), so a link can be
        removed without caring where it points.

        Raises:
            OutsideWorkspace: with a message that says why.
        """
        relative = self._relative(path)
        if not follow_last and relative.parts:
            parent = self._inside(self.root.joinpath(*relative.parts[:-1]).resolve(), path)
            return parent / relative.parts[-1]
        return self._inside(self.root.joinpath(*relative.parts).resolve(), path)

    def relative(self, real: Path) -> str:
        """How a caller names `real` (a path inside the root)."""
        rel = real.relative_to(self.root).as_posix()
        return rel if rel else "."

    def _relative(self, path: str) -> PurePosixPath:
        if not isinstance(path, str) or path == "":
            raise OutsideWorkspace("path is empty; name a file or directory relative to the workspace root")
        if "\x00" in path:
            raise OutsideWorkspace("path contains a NUL character")
        pure = PurePosixPath(path)
        if pure.is_absolute():
            raise OutsideWorkspace(
                f"absolute paths are not allowed ({path!r}); paths are relative to the workspace root"
            )
        if ".." in pure.parts:
            raise OutsideWorkspace(f"'..' is not allowed in paths ({path!r}); the workspace root is the top")
        return pure

    def _inside(self, real: Path, asked: str) -> Path:
        if real != self.root and self.root not in real.parents:
            raise OutsideWorkspace(f"{asked!r} leads outside the workspace (through a symbolic link)")
        return real
