"""The `loraforge` command: bring the platform up, administer it, run its parts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from control_plane.settings import DEFAULT_TENANT, Settings
from loraforge.operator_cli import add_operator_command
from loraforge.queue_cli import add_queue_commands
from loraforge.registry_cli import add_registry_commands
from loraforge.serve_cli import add_serve_commands
from loraforge.supervise import HomeInUseError, stop_on_sigterm


def _database_url(settings: Settings) -> str:
    from control_plane import db

    return db.resolve_database_url(settings)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from control_plane import db

    url = _database_url(settings)
    if args.revision.startswith("-") or args.downgrade:
        db.downgrade(url, args.revision)
    else:
        db.upgrade(url, args.revision)
    print(f"schema at {args.revision}")
    return 0


def cmd_create_key(args: argparse.Namespace, settings: Settings) -> int:
    from control_plane import audit, db, tenants

    url = _database_url(settings)
    db.upgrade(url)
    engine = db.make_engine(url, pool_size=1)
    try:
        with engine.begin() as conn:
            tenant = tenants.get_tenant_by_name(conn, args.tenant)
            if tenant is None:
                tenant = tenants.create_tenant(
                    conn,
                    args.tenant,
                    max_running_jobs=args.max_running_jobs,
                    max_priority=args.max_priority,
                    max_interactive_models=args.max_interactive_models,
                    max_checkpoint_bytes=args.max_checkpoint_bytes,
                )
                limits = {name: getattr(args, name) for name in tenants.LIMITS}
                audit.record(
                    conn, tenant.id, "tenant_created", None, name=tenant.name, limits=limits
                )
            key, plaintext = tenants.create_api_key(
                conn, settings.secret_key, tenant.id, role=args.role, name=args.name
            )
            audit.record(conn, tenant.id, "api_key_created", None, **audit.key_details(key))
    finally:
        engine.dispose()
    print(plaintext)
    return 0


def _or_default(own: int | None, default: int | None) -> str:
    """A tenant's limit as the platform applies it: its own, else the platform's default."""
    if own is not None:
        return str(own)
    return "none" if default is None else f"{default} (default)"


def _bytes_or_default(own: int | None, default: int | None) -> str:
    """A tenant's cap on bytes as `_or_default` says it, with the size to read (`20 GB`)."""
    from control_plane.sizes import human_size

    if own is not None:
        return f"{own} ({human_size(own)})"
    return "none" if default is None else f"{default} ({human_size(default)}, default)"


# An option not given (`none` is given: it clears the limit).
_UNSET = object()


def cmd_tenant(args: argparse.Namespace, settings: Settings) -> int:
    """Show a tenant's limits, setting those given first (`none`: the platform's default,
    `MAX_RUNNING_JOBS_PER_TENANT`, `MAX_PRIORITY_PER_TENANT`,
    `MAX_INTERACTIVE_MODELS_PER_TENANT` or `MAX_CHECKPOINT_BYTES_PER_TENANT`)."""
    from control_plane import audit, db, tenants

    url = _database_url(settings)
    db.upgrade(url)
    engine = db.make_engine(url, pool_size=1)
    given = {
        name: getattr(args, name) for name in tenants.LIMITS if getattr(args, name) is not _UNSET
    }
    try:
        with engine.begin() as conn:
            tenant = (
                tenants.set_limits(conn, args.name, settings.max_running_jobs_per_tenant, **given)
                if given
                else tenants.get_tenant_by_name(conn, args.name)
            )
            if given and tenant is not None:
                audit.record(conn, tenant.id, "tenant_limits_changed", None, limits=given)
    finally:
        engine.dispose()
    if tenant is None:
        print(f"no tenant named {args.name!r}", file=sys.stderr)
        return 1
    running = _or_default(tenant.max_running_jobs, settings.max_running_jobs_per_tenant)
    priority = _or_default(tenant.max_priority, settings.max_priority_per_tenant)
    interactive = _or_default(
        tenant.max_interactive_models, settings.max_interactive_models_per_tenant
    )
    checkpoint_bytes = _bytes_or_default(
        tenant.max_checkpoint_bytes, settings.max_checkpoint_bytes_per_tenant
    )
    print(
        f"tenant {tenant.name} ({tenant.id}): max_running_jobs {running}, max_priority {priority}"
        f", max_interactive_models {interactive}, max_checkpoint_bytes {checkpoint_bytes}"
    )
    return 0


def _limit(low: int, high: int) -> Callable[[str], int | None]:
    """An argparse type: a whole number from `low` to `high`, or `none`."""

    def parse(value: str) -> int | None:
        if value.lower() == "none":
            return None
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number or none") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not from {low} to {high}")
        return number

    return parse


def _bytes_limit(value: str) -> int | None:
    """An argparse type: a cap on bytes, plain (`20000000000`) or with a decimal unit (`500M`,
    `20G`, `1T`), from 1 byte to an exabyte; or `none`."""
    from control_plane.sizes import parse_size
    from control_plane.tenants import MAX_CHECKPOINT_BYTES

    if value.lower() == "none":
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or none") from None
    if not 1 <= size <= MAX_CHECKPOINT_BYTES:
        raise argparse.ArgumentTypeError(f"{value!r} is not from 1 byte to an exabyte (1000000T)")
    return size


def cmd_base_add(args: argparse.Namespace, settings: Settings) -> int:
    """Register a base from a model directory or a GGUF file (workers do the inspection)."""
    from control_plane import db
    from control_plane.services import build_services
    from workers.bases.checkpoints import BaseModelError
    from workers.bases.registration import register_base

    url = _database_url(settings)
    db.upgrade(url)
    services = build_services(settings, database_url=url)
    try:
        record = register_base(
            services, args.name, args.source, revision=args.revision, progress=True
        )
    except BaseModelError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    finally:
        services.close()
    print(
        f"{record.name}: {record.architecture}, {record.parameter_count} parameters, sha256 {record.sha256}"
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run this node's trainer actors (one per GPU, one on the CPU) until interrupted."""
    from control_plane import db
    from loraforge.worker import run_worker
    from workers.actor import RayJoinError

    url = _database_url(settings)
    db.upgrade(url)
    stop_on_sigterm()  # a parent's SIGTERM stops the trainers the way Ctrl-C does
    try:
        return run_worker(settings, url, count=args.trainers)
    except RayJoinError as exc:
        print(f"loraforge worker: {exc}", file=sys.stderr, flush=True)
        return 2


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """The embedded platform until Ctrl-C or SIGTERM; then every child it started stops."""
    import uvicorn

    from control_plane.api.app import create_app
    from loraforge.embedded import embedded_platform

    stop_on_sigterm()
    try:
        with embedded_platform(
            settings,
            trainer=not args.no_trainer,
            default_base=not args.no_default_base,
            interactive=args.interactive,
        ) as platform:
            port = args.port or settings.port
            base = f"http://{settings.host}:{port}"
            print(f"loraforge is up at {base}  (OpenAPI: {base}/docs)")
            print(f"dashboard: {base}/  (sign in with the admin key)")
            print(f"admin key: {platform.admin_key}")
            print(f"data: {settings.home}")
            sys.stdout.flush()
            app = create_app(platform.services)
            uvicorn.run(app, host=settings.host, port=port, log_level="warning")
    except HomeInUseError as exc:
        print(f"loraforge up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    print("loraforge stopped", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from loraforge.demo.run import run_demo

    stop_on_sigterm()
    try:
        return run_demo(settings)
    except HomeInUseError as exc:
        print(f"loraforge demo: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded platform (PostgreSQL, API, celery)")
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--no-trainer", action="store_true", help="do not start a local trainer")
    up.add_argument(
        "--no-default-base",
        action="store_true",
        help="do not fetch and register SmolLM2-135M-Instruct",
    )
    up.add_argument(
        "--interactive",
        nargs="?",
        const="SmolLM2-135M-Instruct",
        default=None,
        metavar="BASE",
        help="also run interactive (Tinker-compatible) sessions on BASE (default: the default base)",
    )
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser(
        "demo", help="bring the platform up, train an adapter on SmolLM2, compare"
    )
    demo.set_defaults(func=cmd_demo)

    worker = sub.add_parser("worker", help="run trainer actors on Ray (one per GPU, or the CPU)")
    worker.add_argument("--trainers", type=int, default=None, help="default: one per GPU, or 1")
    worker.set_defaults(func=cmd_worker)

    base = sub.add_parser("base", help="base models")
    base_sub = base.add_subparsers(dest="base_command", required=True)
    base_add = base_sub.add_parser("add", help="register a model directory or a GGUF file")
    base_add.add_argument("name")
    base_add.add_argument(
        "source",
        help="a Hugging Face model directory, a .gguf file, an s3://bucket/prefix URI, "
        "or a hub id (org/name)",
    )
    base_add.add_argument("--revision", default=None)
    base_add.set_defaults(func=cmd_base_add)

    add_registry_commands(sub)
    add_queue_commands(sub)
    add_operator_command(sub)
    add_serve_commands(sub)

    migrate = sub.add_parser("migrate", help="bring the database schema to a revision")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--downgrade", action="store_true")
    migrate.set_defaults(func=cmd_migrate)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create_key = admin_sub.add_parser("create-key", help="create an API key (and its tenant)")
    create_key.add_argument("--tenant", default=DEFAULT_TENANT)
    create_key.add_argument("--role", choices=("admin", "member", "reader"), default="admin")
    create_key.add_argument("--name", default="cli")
    create_key.add_argument("--max-running-jobs", type=int, default=None)
    create_key.add_argument(
        "--max-priority",
        type=_limit(-100, 100),
        default=None,
        help="the highest priority the new tenant's jobs may ask for "
        "(default: the platform's MAX_PRIORITY_PER_TENANT)",
    )
    create_key.add_argument(
        "--max-interactive-models",
        type=_limit(1, 10_000),
        default=None,
        help="the loaded interactive training models the new tenant may hold "
        "(default: the platform's MAX_INTERACTIVE_MODELS_PER_TENANT)",
    )
    create_key.add_argument(
        "--max-checkpoint-bytes",
        type=_bytes_limit,
        default=None,
        help="the bytes the new tenant's interactive checkpoints may hold: plain, or 500M, 20G, "
        "1T (decimal) (default: the platform's MAX_CHECKPOINT_BYTES_PER_TENANT)",
    )
    create_key.set_defaults(func=cmd_create_key)
    tenant = admin_sub.add_parser("tenant", help="show a tenant's limits, setting those given")
    tenant.add_argument("name")
    tenant.add_argument(
        "--max-running-jobs",
        type=_limit(0, 10_000),
        default=_UNSET,
        help="jobs it may run at once (none: the platform's default)",
    )
    tenant.add_argument(
        "--max-priority",
        type=_limit(-100, 100),
        default=_UNSET,
        help="the highest priority its jobs may ask for (none: the platform's default)",
    )
    tenant.add_argument(
        "--max-interactive-models",
        type=_limit(1, 10_000),
        default=_UNSET,
        help="the loaded interactive training models it may hold (none: the platform's default)",
    )
    tenant.add_argument(
        "--max-checkpoint-bytes",
        type=_bytes_limit,
        default=_UNSET,
        help="the bytes its interactive checkpoints may hold: plain, or 500M, 20G, 1T (decimal; "
        "none: the platform's default)",
    )
    tenant.set_defaults(func=cmd_tenant)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
