"""`loraforge operator`: run the kopf operator (FineTuningJob, AdapterSync, Tenant) with this
package's handlers. In a cluster it logs in with its service account; elsewhere with the kubeconfig."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any


def add_operator_command(subparsers: Any) -> None:
    """Register `loraforge operator` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "operator", help="run the Kubernetes operator (FineTuningJob, AdapterSync, Tenant)"
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed); default: the whole cluster",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch the whole cluster"
    )
    parser.add_argument(
        "--sync-seconds", type=float, default=30.0, help="AdapterSync period (default 30)"
    )
    parser.add_argument(
        "--job-poll-seconds",
        type=float,
        default=10.0,
        help="how often a FineTuningJob's status follows its job, and a Tenant's its tenant "
        "(default 10)",
    )
    parser.add_argument(
        "--only",
        choices=("finetuningjobs", "adaptersyncs", "tenants"),
        action="append",
        default=None,
        help="serve only this kind (repeatable); a serving cluster runs --only=adaptersyncs",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace, _settings: object = None) -> int:
    """Run until SIGINT/SIGTERM (kopf handles both)."""
    import kopf

    from operators.handlers import OperatorConfig, register

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    registry = kopf.OperatorRegistry()
    config = OperatorConfig(sync_seconds=args.sync_seconds, job_poll_seconds=args.job_poll_seconds)
    if args.only:
        config.resources = frozenset(args.only)
    register(registry, config)
    namespaces = args.namespace
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
        )
    )
    return 0
