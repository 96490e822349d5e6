"""`loraforge api` and `loraforge celery ...`: the cluster's long-running processes, one per
container (the chart's API Deployment, celery worker and beat), added to the main parser by
`add_serve_commands`.

Unlike the embedded `up`, these start nothing else: no embedded database, no child processes,
no schema migration (the chart's migration Job runs `loraforge migrate` before them).
"""

from __future__ import annotations

import argparse
import os
import sys

from control_plane.settings import Settings


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the REST API and dashboard on `LORAFORGE_HOST:LORAFORGE_PORT` until stopped."""
    import uvicorn

    from control_plane.api.app import create_app
    from control_plane.services import build_services
    from loraforge import tasks

    services = build_services(settings)
    tasks.configure(services)
    try:
        uvicorn.run(
            create_app(services),
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            proxy_headers=True,
            forwarded_allow_ips=args.forwarded_allow_ips,
        )
    finally:
        services.close()
    return 0


def celery_argv(celery_args: list[str]) -> list[str]:
    """The command line of `celery` bound to loraforge's app, for `loraforge celery ARGS...`."""
    if celery_args and celery_args[0] == "--":
        celery_args = celery_args[1:]
    return [sys.executable, "-m", "celery", "-A", "loraforge.tasks:celery_app", *celery_args]


def cmd_celery(args: argparse.Namespace, settings: Settings) -> int:
    """Replace this process with celery (so that it receives the container's signals itself)."""
    argv = celery_argv(args.celery_args)
    os.execv(argv[0], argv)
    return 1  # not reached: execv returns only by raising


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `api` and `celery` on the `loraforge` parser."""
    api = subparsers.add_parser(
        "api", help="serve the API only (a cluster's API Deployment; migrate first)"
    )
    api.add_argument("--log-level", default="info")
    api.add_argument(
        "--forwarded-allow-ips",
        default="*",
        help="proxies whose X-Forwarded-* headers are trusted (the ingress in front of the pod)",
    )
    api.set_defaults(func=cmd_api)

    celery = subparsers.add_parser(
        "celery",
        help="run celery on loraforge's app: `loraforge celery worker`, `loraforge celery beat`",
    )
    celery.add_argument(
        "celery_args", nargs=argparse.REMAINDER, help="celery's own command and options"
    )
    celery.set_defaults(func=cmd_celery)
