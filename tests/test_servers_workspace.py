"""The `workspace` server, run over stdio as the supervisor runs it, driven by the SDK's Client."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp_types import CallToolResult

from mcp_servers.workspace.server import MAX_READ_BYTES, MAX_WRITE_BYTES
from tests.clients import stdio_server
from tests.clients import text_of as text

ROOT = Path(__file__).resolve().parent.parent


def workspace(root: Path, mode: str = "auto"):
    return stdio_server("workspace", root, mode)


def refused(result: CallToolResult, *words: str) -> str:
    message = text(result)
    assert result.is_error, f"expected a refusal, got: {message}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace root and, beside it, a directory outside it holding a secret."""
    root = tmp_path / "workspace"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    return root, outside


async def test_write_read_list_delete(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    async with workspace(root) as client:
        wrote = await client.call_tool("write_file", {"path": "src/app/main.py", "content": "print('hé')\n"})
        assert not wrote.is_error, text(wrote)
        assert (root / "src/app/main.py").read_text(encoding="utf-8") == "print('hé')\n"

        read = await client.call_tool("read_file", {"path": "src/app/main.py"})
        assert not read.is_error and text(read) == "print('hé')\n"

        await client.call_tool("write_file", {"path": "README", "content": "x" * 10})
        listing = await client.call_tool("list_dir", {})
        assert not listing.is_error
        assert listing.structured_content["path"] == "."
        assert listing.structured_content["entries"] == [
            {"name": "README", "type": "file", "size": 10},
            {"name": "src", "type": "directory", "size": None},
        ]
        nested = await client.call_tool("list_dir", {"path": "src/app"})
        assert [e["name"] for e in nested.structured_content["entries"]] == ["main.py"]

        # Overwriting replaces the whole content.
        await client.call_tool("write_file", {"path": "README", "content": "short"})
        assert (root / "README").read_text() == "short"

        refused(await client.call_tool("delete", {"path": "src"}), "not empty", "recursive")
        assert (root / "src/app/main.py").exists()
        gone = await client.call_tool("delete", {"path": "src", "recursive": True})
        assert not gone.is_error and not (root / "src").exists()
        assert not (await client.call_tool("delete", {"path": "README"})).is_error
        assert list(root.iterdir()) == []

        refused(await client.call_tool("read_file", {"path": "README"}), "does not exist")
        refused(await client.call_tool("delete", {"path": "."}), "root")


async def test_parent_traversal_is_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    async with workspace(root) as client:
        refused(await client.call_tool("read_file", {"path": "../outside/secret.txt"}), "'..'")
        refused(await client.call_tool("read_file", {"path": "a/../../outside/secret.txt"}), "'..'")
        refused(await client.call_tool("list_dir", {"path": ".."}), "'..'")
        refused(await client.call_tool("write_file", {"path": "../outside/new.txt", "content": "x"}), "'..'")
        refused(await client.call_tool("delete", {"path": "../outside/secret.txt"}), "'..'")
    assert not (outside / "new.txt").exists()
    assert (outside / "secret.txt").read_text() == "not yours"


async def test_absolute_paths_are_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    async with workspace(root) as client:
        refused(await client.call_tool("read_file", {"path": str(outside / "secret.txt")}), "absolute")
        refused(await client.call_tool("read_file", {"path": "/etc/passwd"}), "absolute")
        refused(await client.call_tool("write_file", {"path": str(outside / "new.txt"), "content": "x"}), "absolute")
        refused(await client.call_tool("delete", {"path": str(outside / "secret.txt")}), "absolute")
        refused(await client.call_tool("list_dir", {"path": "/"}), "absolute")
    assert not (outside / "new.txt").exists()
    assert (outside / "secret.txt").exists()


async def test_symlinks_that_lead_out_are_refused(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    (root / "out").symlink_to(outside)
    (root / "secret-link").symlink_to(outside / "secret.txt")
    (root / "docs").mkdir()
    (root / "docs/guide.md").write_text("inside")
    (root / "guide-link").symlink_to(root / "docs/guide.md")
    async with workspace(root) as client:
        refused(await client.call_tool("read_file", {"path": "secret-link"}), "outside the workspace")
        refused(await client.call_tool("read_file", {"path": "out/secret.txt"}), "outside the workspace")
        refused(await client.call_tool("list_dir", {"path": "out"}), "outside the workspace")
        refused(
            await client.call_tool("write_file", {"path": "out/planted.txt", "content": "x"}), "outside the workspace"
        )
        refused(await client.call_tool("write_file", {"path": "secret-link", "content": "x"}), "outside the workspace")
        refused(await client.call_tool("delete", {"path": "out/secret.txt"}), "outside the workspace")

        # A link that stays inside is followed.
        inside = await client.call_tool("read_file", {"path": "guide-link"})
        assert not inside.is_error and text(inside) == "inside"

        listing = await client.call_tool("list_dir", {})
        types = {e["name"]: e["type"] for e in listing.structured_content["entries"]}
        assert types == {"docs": "directory", "guide-link": "symlink", "out": "symlink", "secret-link": "symlink"}

        # Deleting a link removes the link, never what it points to.
        assert not (await client.call_tool("delete", {"path": "secret-link"})).is_error
        assert not (await client.call_tool("delete", {"path": "out"})).is_error
    assert not (root / "secret-link").is_symlink() and not (root / "out").is_symlink()
    assert not (outside / "planted.txt").exists()
    assert (outside / "secret.txt").read_text() == "not yours"


async def test_size_limits_and_binary_files(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    (root / "big.log").write_bytes(b"a" * (MAX_READ_BYTES + 1))
    (root / "image.bin").write_bytes(bytes(range(256)))
    async with workspace(root) as client:
        refused(await client.call_tool("read_file", {"path": "big.log"}), str(MAX_READ_BYTES), "bytes")
        refused(await client.call_tool("read_file", {"path": "image.bin"}), "not UTF-8")
        refused(await client.call_tool("read_file", {"path": "."}), "directory", "list_dir")
        too_big = "b" * (MAX_WRITE_BYTES + 1)
        refused(await client.call_tool("write_file", {"path": "huge.txt", "content": too_big}), str(MAX_WRITE_BYTES))
        refused(await client.call_tool("list_dir", {"path": "big.log"}), "not a directory")
        refused(
            await client.call_tool("write_file", {"path": "big.log/inner.txt", "content": "x"}), "parents is a file"
        )
        refused(await client.call_tool("read_file", {"path": "big.log/inner.txt"}), "Not a directory")
    assert not (root / "huge.txt").exists()


async def test_tool_definitions(tmp_path: Path) -> None:
    async with workspace(tmp_path, mode="legacy") as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert sorted(tools) == ["delete", "list_dir", "read_file", "write_file"]
        for name in ("read_file", "list_dir"):
            assert tools[name].annotations.read_only_hint is True
        for name in ("write_file", "delete"):
            assert tools[name].annotations.read_only_hint is False
            assert tools[name].annotations.destructive_hint is True
        assert tools["read_file"].input_schema["required"] == ["path"]
        assert tools["write_file"].input_schema["required"] == ["path", "content"]
        assert "required" not in tools["list_dir"].input_schema  # the path defaults to "."
        assert all(tool.description for tool in tools.values())

        # The handshake era works the same.
        assert not (await client.call_tool("write_file", {"path": "a.txt", "content": "legacy"})).is_error
        assert text(await client.call_tool("read_file", {"path": "a.txt"})) == "legacy"
