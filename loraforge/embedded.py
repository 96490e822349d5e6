"""The embedded platform's parts, shared by `loraforge up` and `loraforge demo`: the bootstrap
admin key, the child processes (celery with beat, the trainer worker) and the default base."""

from __future__ import annotations

import os
import subprocess
import sys

from control_plane import db, tenants
from control_plane.services import Services
from control_plane.settings import Settings
from workers.bases.checkpoints import BaseModelError
from workers.bases.registration import ensure_default_base

DEFAULT_TENANT = "default"


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


def start_trainer_process(database_url: str, settings: Settings) -> subprocess.Popen[bytes]:
    """`loraforge worker` as a child process sharing this process's settings."""
    return subprocess.Popen(
        [sys.executable, "-m", "loraforge.cli", "worker"],
        env=_child_env(database_url, settings),
    )


def _child_env(database_url: str, settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting, so that children (celery, trainers) see
    the same database, store, broker and limits however this process got them."""
    env = dict(os.environ)
    for name, value in settings.model_dump(mode="json", exclude_none=True).items():
        env[f"LORAFORGE_{name.upper()}"] = str(value)
    env["LORAFORGE_DATABASE_URL"] = database_url
    return env


def start_celery_worker(database_url: str, settings: Settings) -> subprocess.Popen[bytes]:
    """The celery worker as a child process that shares this process's settings."""
    return subprocess.Popen(
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
        env=_child_env(database_url, settings),
    )


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
