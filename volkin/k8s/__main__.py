"""`volkin-operator` (or `python3 -m volkin.k8s`): runs the VolumeRefresh operator.

    volkin-operator --controller HOST:PORT [--namespace NS ...] [--liveness URL]

Flags also from env: VOLKIN_CONTROLLER, VOLKIN_OPERATOR_NAMESPACES (comma-separated;
default every namespace), VOLKIN_OPERATOR_LIVENESS (e.g. http://0.0.0.0:8080/healthz).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(prog="volkin-operator",
                                     description="VolumeRefresh operator for Kubernetes")
    parser.add_argument("--controller", default=os.environ.get("VOLKIN_CONTROLLER", ""),
                        help="host:port of the volkin admin API (env VOLKIN_CONTROLLER)")
    parser.add_argument("--namespace", action="append",
                        default=[n for n in os.environ.get("VOLKIN_OPERATOR_NAMESPACES",
                                                            "").split(",") if n],
                        help="watch only this namespace (repeatable; default: all)")
    parser.add_argument("--liveness", default=os.environ.get("VOLKIN_OPERATOR_LIVENESS"),
                        help="URL of the liveness endpoint kopf serves")
    args = parser.parse_args()
    if not args.controller:
        print("volkin-operator: the controller is required: --controller HOST:PORT or "
              "VOLKIN_CONTROLLER", file=sys.stderr)
        sys.exit(2)
    os.environ["VOLKIN_CONTROLLER"] = args.controller

    import kopf

    import volkin.k8s.operator  # noqa: F401  (registers the handlers)

    # standalone: one replica, no peering objects; the Deployment has one replica.
    kopf.run(standalone=True, clusterwide=not args.namespace,
             namespaces=args.namespace, liveness_endpoint=args.liveness)


if __name__ == "__main__":
    main()
