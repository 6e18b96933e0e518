"""An onboarded package's server.json: taken from the package when it ships one (crafted here: in a
wheel pip downloads from a find-links directory, at the root of an sdist an index's JSON API names,
in an npm package), refused when it does not agree with the package, generated only when absent."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.onboard import OnboardError, fetch_pypi
from registry.onboard_manifest import GENERATED, SdistUnavailable, Shipped, adopt, in_npm, in_sdist
from sandbox.runtime import current_python
from tests.test_registry_code_scan import wheel


def shipped_json(name: str = "shipped-server", version: str = "1.0", **changes) -> dict:
    """A server.json as the official registry's publisher writes it for a PyPI package."""
    document = {
        "$schema": "https://static.modelcontextprotocol.io/schemas/2025-10-17/server.schema.json",
        "name": "io.github.example/shipped", "description": "A server that ships its own server.json", "version": version,
        "repository": {"url": "https://github.com/example/shipped", "source": "github"},
        "packages": [
            {"registryType": "npm", "identifier": "@example/shipped", "version": version, "transport": {"type": "stdio"}},
            {"registryType": "pypi", "identifier": name, "version": version, "transport": {"type": "stdio"},
             "environmentVariables": [{"name": "SHIPPED_TOKEN", "isSecret": True}]},
        ],
        "remotes": [{"type": "streamable-http", "url": "https://shipped.example/mcp"}],
        "_meta": {"io.modelcontextprotocol.registry/publisher-provided": {"tool": "publisher"}},
    }
    document.update(changes)
    return document


def server_wheel(where: Path, version: str = "1.0", document: dict | None = None) -> Path:
    files = {"shipped_server/__init__.py": b"def main(): pass\n"}
    if document is not None:
        files["shipped_server/server.json"] = json.dumps(document).encode()
    return wheel(where, "shipped-server", version, files, scripts={"shipped-server": "shipped_server:main"})


def test_a_wheels_server_json_is_taken_when_it_agrees_and_refused_when_not(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    server_wheel(links, "1.0", shipped_json())
    server_wheel(links, "2.0", shipped_json(version="1.9"))  # a stale file: its version is not the package's
    server_wheel(links, "3.0", {**shipped_json(version="3.0"), "packages": [shipped_json()["packages"][0]]})  # another package's
    server_wheel(links, "4.0", shipped_json(version="4.0", description=""))  # not valid
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    python = current_python()

    taken = fetch_pypi("pypi:shipped-server==1.0", python)
    assert taken.manifest_source == "taken from the wheel's shipped_server/server.json"
    manifest = taken.manifest
    assert manifest["name"] == "io.github.example/shipped" and manifest["description"].startswith("A server that ships")
    assert manifest["packages"] == [{**shipped_json()["packages"][1]}]  # the entry it runs, nothing else
    assert "remotes" not in manifest  # never connected to
    assert manifest["_meta"]["io.mcpfleet"] == {"command": "shipped-server"}
    assert manifest["_meta"]["io.modelcontextprotocol.registry/publisher-provided"] == {"tool": "publisher"}
    assert fetch_pypi("pypi:shipped-server==1.0", python, name="io.example/mine").manifest["name"] == "io.example/mine"

    with pytest.raises(OnboardError, match=r"does not agree with shipped-server 2\.0: its version is '1\.9'.*; refused"):
        fetch_pypi("pypi:shipped-server==2.0", python)
    with pytest.raises(OnboardError, match=r"does not describe pypi:shipped-server \(it lists: npm:@example/shipped\)"):
        fetch_pypi("pypi:shipped-server==3.0", python)
    with pytest.raises(OnboardError, match=r"is not valid: description"):
        fetch_pypi("pypi:shipped-server==4.0", python)


def test_a_package_without_one_gets_a_generated_server_json(tmp_path, monkeypatch):
    links = tmp_path / "links"
    links.mkdir()
    server_wheel(links, "5.0")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    onboarded = fetch_pypi("pypi:shipped-server==5.0", current_python())
    assert onboarded.manifest_source.startswith(GENERATED), onboarded.manifest_source  # no sdist on the index (or no index)
    assert onboarded.manifest["name"] == "io.pypi/shipped-server"


@pytest.fixture
def index(tmp_path) -> Iterator[tuple[str, Path]]:
    """A JSON API as PyPI's (`/pypi/NAME/VERSION/json`) served from a directory."""
    root = tmp_path / "index"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi", root
    server.shutdown()


def publish_sdist(root: Path, version: str, members: dict[str, bytes], *, lie: bool = False) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    filename = f"shipped_server-{version}.tar.gz"
    (root / "files").mkdir(exist_ok=True)
    (root / "files" / filename).write_bytes(data)
    release = root / "pypi" / "shipped-server" / version
    release.mkdir(parents=True)
    (release / "json").write_text(json.dumps({"urls": [
        {"packagetype": "bdist_wheel", "filename": "x.whl", "url": "../../../files/x.whl"},
        {"packagetype": "sdist", "filename": filename, "url": f"../../../files/{filename}", "size": len(data),
         "digests": {"sha256": "0" * 64 if lie else hashlib.sha256(data).hexdigest()}},
    ]}))


def test_an_sdists_server_json_is_found_at_its_root_and_checked(index):
    url, root = index
    publish_sdist(root, "1.0", {"shipped_server-1.0/PKG-INFO": b"Name: shipped-server\n",
                                "shipped_server-1.0/server.json": json.dumps(shipped_json()).encode()})
    found = in_sdist("shipped-server", "1.0", index=url)
    assert found is not None and found.where == "the sdist shipped_server-1.0.tar.gz (shipped_server-1.0/server.json)"
    assert adopt(found, "pypi", "shipped-server", "1.0", "shipped-server")["name"] == "io.github.example/shipped"
    # Deeper than the root (a test fixture, an example) is not the package's own.
    publish_sdist(root, "2.0", {"shipped_server-2.0/tests/server.json": json.dumps(shipped_json(version="2.0")).encode()})
    assert in_sdist("shipped-server", "2.0", index=url) is None
    assert in_sdist("shipped-server", "9.9", index=url) is None  # no such release on the index
    publish_sdist(root, "3.0", {"shipped_server-3.0/server.json": b"{}"}, lie=True)
    with pytest.raises(OnboardError, match="does not match the sha256 the index gives"):
        in_sdist("shipped-server", "3.0", index=url)
    publish_sdist(root, "4.0", {"shipped_server-4.0/server.json": b"{not json"})
    with pytest.raises(OnboardError, match="is not valid JSON"):
        in_sdist("shipped-server", "4.0", index=url)
    with pytest.raises(SdistUnavailable):
        in_sdist("shipped-server", "1.0", index="http://127.0.0.1:9/pypi", timeout=5)
    # A mirror without the per-release API: the project's, by version.
    publish_sdist(root, "5.0", {"shipped_server-5.0/server.json": json.dumps(shipped_json(version="5.0")).encode()})
    release = root / "pypi" / "shipped-server" / "5.0"
    (root / "pypi" / "shipped-server" / "json").write_text(json.dumps({"releases": {"5.0": json.loads((release / "json").read_text())["urls"]}})
                                                           .replace("../../../files/", "../../files/"))
    (release / "json").unlink()
    release.rmdir()
    found = in_sdist("shipped-server", "5.0", index=url)
    assert found is not None and found.document["version"] == "5.0"


def test_a_real_package_that_ships_its_server_json_in_its_sdist():
    """albumentationsx-mcp on PyPI ships the server.json it is in the official registry with."""
    try:
        onboarded = fetch_pypi("pypi:albumentationsx-mcp==1.21.1", current_python())
    except OnboardError as exc:
        pytest.skip(f"PyPI cannot be reached: {exc}")
    assert onboarded.manifest_source == "taken from the sdist albumentationsx_mcp-1.21.1.tar.gz (albumentationsx_mcp-1.21.1/server.json)"
    assert onboarded.manifest["name"] == "io.github.dKosarevsky/albu-mcp"
    assert onboarded.manifest["_meta"]["io.mcpfleet"] == {"command": "albumentationsx-mcp"}


def test_an_npm_packages_server_json_must_be_its_own(tmp_path):
    package = tmp_path / "node_modules" / "@example" / "shipped"
    package.mkdir(parents=True)
    assert in_npm(package, "@example/shipped") is None
    (package / "server.json").write_text(json.dumps(shipped_json()))
    found = in_npm(package, "@example/shipped")
    assert isinstance(found, Shipped) and found.where == "the npm package's server.json"
    manifest = adopt(found, "npm", "@example/shipped", "1.0", "shipped")
    assert manifest["packages"] == [shipped_json()["packages"][0]] and manifest["_meta"]["io.mcpfleet"] == {"command": "shipped"}
    with pytest.raises(OnboardError, match="does not agree with @example/shipped 1.1"):
        adopt(found, "npm", "@example/shipped", "1.1", "shipped")
    with pytest.raises(OnboardError, match="does not describe npm:@other/shipped"):
        adopt(found, "npm", "@other/shipped", "1.0", "shipped")
