"""What of a wheel's Requires-Dist reaches pip, and the layer digest: no fleet needed."""

from __future__ import annotations

import pytest

from registry.dependencies import DependencyError, layer_digest, requirements_to_resolve


def test_only_index_requirements_reach_pip_rewritten_and_the_products_own_packages_stay_out():
    kept = requirements_to_resolve(["httpx>=0.27", "mcpfleet-sdk", "MCPFleet", 'tomli; python_version < "3.11"'])
    assert kept == ["httpx>=0.27", 'tomli; python_version < "3.11"']
    for hostile in ("--index-url https://evil.example/simple", "-r /etc/shadow", "x @ https://evil.example/x.whl",
                    "httpx\n--extra-index-url https://evil.example"):
        with pytest.raises(DependencyError):
            requirements_to_resolve([hostile])


def test_the_layer_digest_names_the_wheels_whatever_their_order_or_spelling():
    lock = [{"name": "Text_Unidecode", "version": "1.3", "sha256": "a" * 64}, {"name": "python-slugify", "version": "8.0.4", "sha256": "b" * 64}]
    assert layer_digest(lock) == layer_digest([lock[1], {**lock[0], "name": "text-unidecode"}])
    assert layer_digest(lock) != layer_digest([lock[0], {**lock[1], "sha256": "c" * 64}])


def test_a_downloaded_wheel_must_be_the_one_pip_named_and_a_wheel(tmp_path):
    import hashlib

    from registry.dependencies import fetch
    from tests.test_registry_artifacts import WHEEL

    path = tmp_path / "demo_tool-1.0.0-py3-none-any.whl"
    path.write_bytes(WHEEL)
    kept: list[bytes] = []
    item = {"name": "demo-tool", "version": "1.0.0", "url": path.as_uri(), "sha256": hashlib.sha256(WHEEL).hexdigest()}
    (locked,) = fetch([item], kept.append)
    assert kept == [WHEEL] and locked.sha256 == item["sha256"] and locked.bytes == len(WHEEL)
    with pytest.raises(DependencyError, match="does not match the sha256"):
        fetch([{**item, "sha256": "0" * 64}], kept.append)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DependencyError, match="is refused: the upload is not a wheel"):
        fetch([{**item, "sha256": hashlib.sha256(b"not a zip at all").hexdigest()}], kept.append)
    with pytest.raises(DependencyError, match="only http"):
        fetch([{**item, "url": "ftp://example.com/x.whl"}], kept.append)
    assert len(kept) == 1  # nothing refused was kept
