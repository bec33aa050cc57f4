"""The ``charlora`` command line: run the operator (more subcommands arrive with the trainer and the server)."""

from __future__ import annotations

import argparse
import sys


def _run_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf
    from prometheus_client import start_http_server

    from charlora import reconciling  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    kopf.configure(verbose=args.verbose)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=f"http://{args.metrics_address}:{args.health_port}/healthz" if args.health_port else None,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="charlora", description="Character LoRAs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser(
        "operator",
        help="run the operator",
        description="Run the operator against the cluster of $KUBECONFIG (or in-cluster credentials). "
        "Defaults come from CHARLORA_* environment variables (see charlora.config.OperatorConfig).",
        epilog="Example: CHARLORA_S3_ENDPOINT=http://minio:9000 charlora operator --namespace companions",
    )
    op.add_argument("--namespace", action="append", help="watch only this namespace (repeatable; default: all)")
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0 disables)")
    op.add_argument("--metrics-address", default="0.0.0.0", help="address of the metrics and health endpoints")
    op.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0 disables)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(run=_run_operator)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
