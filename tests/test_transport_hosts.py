"""Which Host and Origin headers the gateway's DNS-rebinding protection admits (the SDK's own check,
given the settings gateway/app.py builds): its own address, loopback when it listens on every
interface, the public URL's name and the names in MCPFLEET_ALLOWED_HOSTS (a Kubernetes Service's),
and nothing else."""

from __future__ import annotations

import asyncio

import pytest
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request

from core.settings import load_settings
from gateway.app import transport_security


def admitted(settings, host: str, origin: str | None = None) -> bool:
    headers = [(b"host", host.encode()), (b"content-type", b"application/json")]
    if origin:
        headers.append((b"origin", origin.encode()))
    request = Request({"type": "http", "method": "POST", "path": "/mcp", "headers": headers})
    check = TransportSecurityMiddleware(transport_security(settings)).validate_request(request, is_post=True)
    return asyncio.run(check) is None


@pytest.fixture
def in_a_pod(monkeypatch):
    monkeypatch.setenv("MCPFLEET_HOST", "0.0.0.0")
    monkeypatch.setenv("MCPFLEET_PORT", "8080")
    monkeypatch.setenv("MCPFLEET_ALLOWED_HOSTS", "mcpfleet-gateway,mcpfleet-gateway.mcpfleet.svc")
    monkeypatch.setenv("MCPFLEET_PUBLIC_URL", "https://mcp.example.com/mcp")
    return load_settings()


def test_a_service_name_and_the_public_name_are_admitted(in_a_pod):
    assert admitted(in_a_pod, "mcpfleet-gateway:8080")
    assert admitted(in_a_pod, "mcpfleet-gateway.mcpfleet.svc:8080")
    assert admitted(in_a_pod, "mcp.example.com")  # behind an ingress on 443: no port in the Host
    assert admitted(in_a_pod, "mcp.example.com", origin="https://mcp.example.com")
    assert admitted(in_a_pod, "127.0.0.1:8080")


def test_any_other_name_or_origin_is_refused(in_a_pod):
    assert not admitted(in_a_pod, "evil.example:8080")
    assert not admitted(in_a_pod, "mcp.example.com.evil.example")
    assert not admitted(in_a_pod, "mcpfleet-gateway-evil:8080")
    assert not admitted(in_a_pod, "mcp.example.com", origin="https://evil.example")


def test_without_names_only_its_own_address_is_admitted(monkeypatch):
    monkeypatch.setenv("MCPFLEET_HOST", "10.0.0.5")
    monkeypatch.setenv("MCPFLEET_PORT", "8080")
    monkeypatch.delenv("MCPFLEET_ALLOWED_HOSTS", raising=False)
    monkeypatch.delenv("MCPFLEET_PUBLIC_URL", raising=False)
    settings = load_settings()
    assert admitted(settings, "10.0.0.5:8080")
    assert not admitted(settings, "mcpfleet-gateway:8080")
    assert not admitted(settings, "127.0.0.1:8080")
