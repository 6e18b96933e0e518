"""A user's catalog: what their servers offer, merged under the names the gateway shows.

Tools and prompts are namespaced `<server>__<name>` (bare for `MCPFLEET_BARE_TOOL_NAMES`);
resource URIs are kept as the servers give them and routed by lookup, templates by match.
Servers are taken in name order, so a catalog depends only on what they offer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp.shared.uri_template import UriTemplate

log = logging.getLogger("gateway.routing")

SEPARATOR = "__"


@dataclass(eq=False)  # compared and cached by identity
class Catalog:
    """What one user's servers offer, under the names the gateway shows."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    templates: list[dict[str, Any]] = field(default_factory=list)
    # public name -> (server, the server's own name)
    tool_owner: dict[str, tuple[str, str]] = field(default_factory=dict)
    prompt_owner: dict[str, tuple[str, str]] = field(default_factory=dict)
    resource_owner: dict[str, str] = field(default_factory=dict)
    template_owner: list[tuple[UriTemplate, str]] = field(default_factory=list)


def public_name(server: str, name: str, bare_servers: frozenset[str]) -> str:
    return name if server in bare_servers else f"{server}{SEPARATOR}{name}"


def build_catalog(per_server: Mapping[str, Mapping[str, Any]], bare_servers: frozenset[str] = frozenset()) -> Catalog:
    """Merge the servers' offers. Servers are taken in name order, so the result depends only on what they offer."""
    catalog = Catalog()
    for server in sorted(per_server):
        offer = per_server[server]
        for kind, owner, out in (("tools", catalog.tool_owner, catalog.tools), ("prompts", catalog.prompt_owner, catalog.prompts)):
            for item in offer.get(kind) or []:
                name = public_name(server, item["name"], bare_servers)
                if name in owner:
                    log.warning("%s %r of server %s is hidden by server %s", kind, name, server, owner[name][0])
                    continue
                owner[name] = (server, item["name"])
                out.append({**item, "name": name})
        for resource in offer.get("resources") or []:
            if resource["uri"] in catalog.resource_owner:
                continue  # the first server (by name) keeps a URI two servers claim
            catalog.resource_owner[resource["uri"]] = server
            catalog.resources.append(dict(resource))
        for template in offer.get("resourceTemplates") or []:
            catalog.templates.append(dict(template))
            try:
                catalog.template_owner.append((UriTemplate.parse(template["uriTemplate"]), server))
            except Exception:
                log.warning("server %s offers an unparseable URI template %r", server, template.get("uriTemplate"))
    catalog.tools.sort(key=lambda t: t["name"])
    catalog.prompts.sort(key=lambda p: p["name"])
    return catalog


def same_offers(a: tuple[tuple[str, Any], ...], b: tuple[tuple[str, Any], ...]) -> bool:
    """The same servers' offers, each the very same object: a catalog built from them would be the same."""
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] for x, y in zip(a, b))
