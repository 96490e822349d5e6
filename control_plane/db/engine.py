"""Database connections: URL normalisation, the embedded PostgreSQL, and engines.

Nothing here runs at import time: callers build engines from a `Settings` object.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from control_plane.settings import Settings

_embedded_lock = threading.Lock()
_embedded_servers: dict[Path, Any] = {}


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver whatever flavour of PostgreSQL URL was given."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def libpq_url(url: str) -> str:
    """The same URL for libpq (psycopg.connect), without SQLAlchemy's driver suffix."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or find running) a real PostgreSQL through `pgserver`; return its URL.

    The server keeps running after this process exits so that a second `loraforge up` and the
    trainers find the same data; it is started at most once per process.
    """
    import pgserver

    data_dir = data_dir.resolve()
    with _embedded_lock:
        server = _embedded_servers.get(data_dir)
        if server is None:
            data_dir.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(data_dir, cleanup_mode=None)  # type: ignore[attr-defined]
            _embedded_servers[data_dir] = server
        return normalize_url(str(server.get_uri()))


def resolve_database_url(settings: Settings) -> str:
    if settings.database_url:
        return normalize_url(settings.database_url)
    return start_embedded_postgres(settings.home / "pgdata")


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int | None = None,
    pool_timeout: float = 30.0,
    connect_timeout: int = 10,
) -> Engine:
    """A pooled engine. `pool_timeout`: how long a checkout waits for a free connection before
    `sqlalchemy.exc.TimeoutError`; `connect_timeout`: how long a new connection may take (a
    database that does not answer fails fast instead of hanging the caller)."""
    return create_engine(
        normalize_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout},
        future=True,
    )
