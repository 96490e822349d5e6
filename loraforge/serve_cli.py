"""`loraforge api`, `loraforge celery ...` and `loraforge interactive`: the cluster's
long-running processes, one per container (the chart's API Deployment, celery worker and beat,
the interactive executors), added to the main parser by `add_serve_commands`.

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


def cmd_interactive(args: argparse.Namespace, settings: Settings) -> int:
    """Run the calls of interactive (Tinker-compatible) sessions on one resident base until
    stopped: the base is loaded once, each model a session creates is an adapter on it."""
    import secrets
    import socket
    import threading

    from control_plane.services import build_services
    from loraforge.supervise import stop_on_sigterm
    from workers.interactive.runner import InteractiveRunner

    stop_on_sigterm()
    services = build_services(settings)
    # Random per start: a container restarted in its pod keeps its host name and pid (1), and
    # must not pass for the executor that held the models lost with it.
    executor_id = f"{socket.gethostname()}-interactive-{os.getpid()}-{secrets.token_hex(3)}"
    stop = threading.Event()
    try:
        runner = InteractiveRunner(
            services,
            executor_id,
            args.base,
            work_dir=settings.home / "interactive" / executor_id,
            precision=args.precision,
        )
        print(f"{executor_id}: serving interactive sessions on {runner.base.name}", flush=True)
        runner.serve(stop)
    except KeyboardInterrupt:
        pass
    except ValueError as exc:
        print(f"loraforge interactive: {exc}", file=sys.stderr)
        return 2
    finally:
        stop.set()
        services.close()
    return 0


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

    interactive = subparsers.add_parser(
        "interactive",
        help="run interactive (Tinker-compatible) sessions' calls on one resident base",
    )
    interactive.add_argument("--base", required=True, help="the base model's name or id")
    interactive.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    interactive.set_defaults(func=cmd_interactive)
