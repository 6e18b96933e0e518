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
