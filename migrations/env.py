"""Alembic environment: migrations run against the URL placed in the config by control_plane.db."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from control_plane.db import include_name
from control_plane.db.tables import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url must be set by control_plane.db.alembic_config"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_name=include_name,
            compare_type=True,
            compare_server_default=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("loraforge migrations run online only")
run_migrations_online()
