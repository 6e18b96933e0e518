"""`mcpfleet-operator`: runs the handlers with kopf in the namespaces of MCPFLEET_NAMESPACES (never cluster-wide).

Credentials are found as kubectl finds them (kopf's login handlers: in-cluster service account, else
KUBECONFIG or ~/.kube/config). Replicas coordinate through kopf's peering object named by
MCPFLEET_OPERATOR_PEERING (default `mcpfleet`; empty: standalone, for a single replica).
"""

from __future__ import annotations

import argparse
import logging

import kopf

from mcpfleet_operator.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mcpfleet-operator", description=__doc__)
    parser.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    settings = Settings.from_env()
    from mcpfleet_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=False,
        namespaces=list(settings.namespaces),
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
