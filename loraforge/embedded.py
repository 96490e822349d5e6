"""The embedded platform that `loraforge up` and `loraforge demo` run: its PostgreSQL, the
bootstrap admin key, the supervised children (celery with beat, the trainer worker) and the
default base.

`embedded_platform()` owns all of it for as long as its `with` block runs: it takes the home's
lock (one `up` per home), starts the embedded PostgreSQL (restarted if it stops answering), the
children (restarted when they exit), and on the way out stops the children (SIGTERM to each
child, up to `TRAINER_STOP_GRACE_S` for a trainer to checkpoint its step, then
SIGKILL) and the PostgreSQL it started. Whoever runs it turns SIGTERM into KeyboardInterrupt
(`loraforge.supervise.stop_on_sigterm`), so that Kubernetes', systemd's and Docker's stop ends
it the way Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

from control_plane import db, tenants
from control_plane.services import Services, build_services
from control_plane.settings import DEFAULT_TENANT, Settings
from loraforge import tasks
from loraforge.supervise import ChildSpec, HomeLock, Supervisor
from workers.bases.checkpoints import BaseModelError
from workers.bases.registration import ensure_default_base

# A trainer stopped with SIGTERM finishes its step, checkpoints it and hands the job back.
TRAINER_STOP_GRACE_S = 30.0
CELERY_STOP_GRACE_S = 10.0


def ensure_admin_key(settings: Settings, database_url: str) -> str:
    """The admin key of the default tenant, created on first start and kept in LORAFORGE_HOME.

    Keys are stored hashed, so the plaintext lives only in `<home>/admin-key` (mode 0600): a
    second `up` finds it there and prints it again.
    """
    key_file = settings.home / "admin-key"
    engine = db.make_engine(database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            if key_file.exists():
                existing = key_file.read_text().strip()
                if tenants.authenticate(conn, settings.secret_key, existing) is not None:
                    return existing
            tenant = tenants.get_tenant_by_name(conn, DEFAULT_TENANT) or tenants.create_tenant(
                conn, DEFAULT_TENANT
            )
            _, plaintext = tenants.create_api_key(
                conn, settings.secret_key, tenant.id, role="admin", name="bootstrap"
            )
    finally:
        engine.dispose()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(plaintext + "\n")
    return plaintext


def child_env(database_url: str, settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting, so that children (celery, trainers) see
    the same database, store, broker and limits however this process got them."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        # Lists and mappings as JSON: how pydantic-settings reads complex values back.
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        env[f"LORAFORGE_{name.upper()}"] = text
    env["LORAFORGE_DATABASE_URL"] = database_url
    return env


def trainer_spec(database_url: str, settings: Settings) -> ChildSpec:
    """`loraforge worker` as a child sharing this process's settings."""
    return ChildSpec(
        "trainer worker",
        [sys.executable, "-m", "loraforge.cli", "worker"],
        child_env(database_url, settings),
        stop_grace_s=TRAINER_STOP_GRACE_S,
    )


def interactive_spec(database_url: str, settings: Settings, base: str) -> ChildSpec:
    """`loraforge interactive` on `base` as a child: runs interactive sessions' calls."""
    return ChildSpec(
        f"interactive executor ({base})",
        [sys.executable, "-m", "loraforge.cli", "interactive", "--base", base],
        child_env(database_url, settings),
    )


def celery_spec(database_url: str, settings: Settings) -> ChildSpec:
    """The celery worker with its beat (queue maintenance) as a child."""
    return ChildSpec(
        "celery",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "loraforge.tasks:celery_app",
            "worker",
            "--pool=threads",
            "--concurrency=2",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-B",
            "-s",
            str(settings.home / "celerybeat-schedule"),
        ],
        child_env(database_url, settings),
        stop_grace_s=CELERY_STOP_GRACE_S,
    )


class EmbeddedPostgres:
    """The PostgreSQL (through `pgserver`) that an embedded platform owns: started with it,
    restarted when it stops answering, stopped with it."""

    name = "embedded PostgreSQL"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start the server (or find it running) and return its SQLAlchemy URL."""
        import pgserver

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: this object decides when the server stops, not pgserver's atexit.
        self._server = pgserver.get_server(self.data_dir, cleanup_mode=None)  # type: ignore[attr-defined]
        self.restart()  # pgserver hands out a cached handle: its server may have stopped since
        return db.normalize_url(str(self._server.get_uri()))

    def alive(self) -> bool:
        try:
            with psycopg.connect(db.libpq_url(self._server.get_uri()), connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def restart(self) -> None:
        with self._server._lock:  # pgserver's own inter-process lock around starting a server
            self._server.ensure_postgres_running()

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster: what `pg_ctl stop -m fast` sends; signalled
        directly because pg_ctl runs as pgserver's system user, who may not read the path)."""
        self._server = None
        postmaster = postmaster_pid(self.data_dir)
        if postmaster is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(postmaster)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                process.kill()


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the PostgreSQL serving `data_dir`, if one is running."""
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        if psutil.pid_exists(pid):
            return pid
    return None


@dataclass(frozen=True)
class Platform:
    """What a running embedded platform gives its caller."""

    database_url: str
    admin_key: str
    services: Services
    supervisor: Supervisor


@contextlib.contextmanager
def embedded_platform(
    settings: Settings,
    *,
    trainer: bool = True,
    default_base: bool = True,
    interactive: str | None = None,
) -> Iterator[Platform]:
    """Run the embedded platform for the duration of the block (see the module docstring)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with HomeLock(settings.home), contextlib.ExitStack() as stack:
        postgres: EmbeddedPostgres | None = None
        if settings.embedded_database:
            postgres = EmbeddedPostgres(settings.home / "pgdata")
            stack.callback(postgres.stop)
            url = postgres.start()
        else:
            url = db.resolve_database_url(settings)
        db.upgrade(url)
        key = ensure_admin_key(settings, url)
        services = build_services(settings, database_url=url)
        stack.callback(services.close)
        if default_base:
            make_default_base_available(services)
        tasks.configure(services)
        specs = [celery_spec(url, settings)]
        if trainer:
            specs.append(trainer_spec(url, settings))
        if interactive is not None:
            specs.append(interactive_spec(url, settings, interactive))
        supervisor = Supervisor(specs, watched=[postgres] if postgres is not None else [])
        stack.callback(supervisor.stop)
        supervisor.start()
        yield Platform(url, key, services, supervisor)


def make_default_base_available(services: Services) -> None:
    """Make SmolLM2-135M-Instruct available; without it (offline) the platform still serves."""
    try:
        base = ensure_default_base(services, progress=True)
    except BaseModelError as exc:
        print(
            f"warning: the default base is not available ({exc}); register one with "
            "`loraforge base add NAME PATH`",
            file=sys.stderr,
        )
        return
    print(f"base model {base.name} ready")
