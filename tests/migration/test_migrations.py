"""Alembic is the only way the schema changes: it must go up, come down, and match the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool

from control_plane import db
from control_plane.db import include_name
from control_plane.db.tables import Base


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_and_downgrade_back(empty_database_url: str) -> None:
    assert _tables(empty_database_url) == set()
    db.upgrade(empty_database_url)
    assert set(Base.metadata.tables) <= _tables(empty_database_url)
    db.downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) == {"alembic_version"}
    db.upgrade(empty_database_url)
    assert set(Base.metadata.tables) <= _tables(empty_database_url)


def test_models_match_migrations(empty_database_url: str) -> None:
    db.upgrade(empty_database_url)
    engine = create_engine(empty_database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_name": include_name,
                    "compare_type": True,
                    "compare_server_default": True,
                },
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
