"""Published wheels: unpacked safely, linked per sandbox, and kept in an S3-compatible store.

No S3 service runs on these machines: moto's server stands in for it. It serves the S3 REST API
on loopback and boto3 talks to it exactly as to AWS or MinIO.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from registry.artifacts import ArtifactError, ArtifactStore, S3Artifacts, install_wheel, server_spec, wheel_metadata
from tests.conftest import free_port


def wheel_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


WHEEL = wheel_bytes({
    "demo_tool/__init__.py": "",
    "demo_tool/server.py": "def main():\n    return 0\n",
    "demo_tool-1.0.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo-tool\nVersion: 1.0.0\nRequires-Dist: mcp==2.3.0\n",
    "demo_tool-1.0.0.dist-info/entry_points.txt": "[console_scripts]\ndemo-tool = demo_tool.server:main\n",
    "demo_tool-1.0.0.data/purelib/extra_module.py": "X = 1\n",
    "demo_tool-1.0.0.data/scripts/demo": "#!/bin/sh\n",
})


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="wheels")
    yield "s3://wheels/fleet-a"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_a_wheel_is_unpacked_like_an_installer_would(tmp_path):
    store = ArtifactStore(tmp_path)
    sha = store.store(WHEEL)
    installed = store.install(sha)
    assert (installed / "demo_tool" / "server.py").is_file()
    assert (installed / "extra_module.py").is_file()  # .data/purelib merged in
    assert not (installed / "demo").exists()  # scripts are not installed
    metadata, scripts = wheel_metadata(store.wheel_path(sha))
    assert metadata["Name"] == "demo-tool" and scripts == {"demo-tool": "demo_tool.server:main"}
    spec = server_spec("demo", sha, scripts["demo-tool"], ("API_TOKEN",))
    assert spec.revision == sha and spec.env["MCPFLEET_DECLARED_SECRETS"] == "API_TOKEN"
    assert f"/opt/tools/{sha}" in spec.argv[-1]


def test_a_wheel_naming_paths_outside_itself_is_refused(tmp_path):
    evil = tmp_path / "evil.whl"
    evil.write_bytes(wheel_bytes({"../../escaped.py": "X = 1\n"}))
    with pytest.raises(ArtifactError, match="outside itself"):
        install_wheel(evil, tmp_path / "target")
    assert not (tmp_path.parent / "escaped.py").exists()


def test_a_sandbox_gets_links_to_its_own_installs_only(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.store(WHEEL)
    second = store.store(wheel_bytes({"other/__init__.py": "", "other-1.0.dist-info/METADATA": "Name: other\nVersion: 1.0\n"}))
    tools = tmp_path / "sbx" / "tools"
    tools.parent.mkdir()
    store.link_into(tools, {first, second})
    assert sorted(p.name for p in tools.iterdir()) == sorted([first, second])
    store.link_into(tools, {second})
    assert [p.name for p in tools.iterdir()] == [second]
    linked = tools / second / "other" / "__init__.py"
    assert linked.stat().st_ino == (store.install_path(second) / "other" / "__init__.py").stat().st_ino


def test_wheels_go_to_the_s3_store_and_come_back_checked(tmp_path, s3):
    publishing_gateway = ArtifactStore(tmp_path / "a", S3Artifacts(s3))
    sha = publishing_gateway.store(WHEEL)
    objects = boto3.client("s3").list_objects_v2(Bucket="wheels")["Contents"]
    assert [o["Key"] for o in objects] == [f"fleet-a/{sha}.whl"]

    # Another gateway (its own home, nothing cached) runs the same version: fetched and checked.
    other_gateway = ArtifactStore(tmp_path / "b", S3Artifacts(s3))
    assert other_gateway.wheel_path(sha).read_bytes() == WHEEL
    assert (other_gateway.install(sha) / "demo_tool" / "server.py").is_file()


def test_a_changed_object_in_the_s3_store_is_refused(tmp_path, s3):
    sha = hashlib.sha256(WHEEL).hexdigest()
    boto3.client("s3").put_object(Bucket="wheels", Key=f"fleet-a/{sha}.whl", Body=WHEEL + b"tampered")
    store = ArtifactStore(tmp_path, S3Artifacts(s3))
    with pytest.raises(ArtifactError, match="does not match its digest"):
        store.wheel_path(sha)
    assert not (store.artifacts / f"{sha}.whl").exists()  # nothing of it kept
    with pytest.raises(ArtifactError, match="could not be fetched"):
        store.wheel_path("0" * 64)


def test_a_bad_s3_url_is_a_clear_error():
    with pytest.raises(ArtifactError, match="s3://bucket"):
        S3Artifacts("https://example.com/wheels")
