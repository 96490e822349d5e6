"""Schema migrations: alembic (revisions in `migrations/`) is the only way the schema changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from control_plane.db.engine import normalize_url

# Tables in the database that are not loraforge's schema (kombu's SQLAlchemy transport, used as
# the embedded celery broker, creates its own).
FOREIGN_TABLE_PREFIXES = ("kombu_",)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic filter: compare and migrate only loraforge's own tables."""
    if type_ == "table" and name is not None:
        return not name.startswith(FOREIGN_TABLE_PREFIXES)
    return True


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def schema_behind(conn: Connection) -> str | None:
    """Why the database's schema is not the code's (a sentence an operator can act on), or None
    when it is at the head revision."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(migrations_dir())).get_current_head()
    current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return None
    at = "no loraforge schema" if current is None else f"the schema at revision {current}"
    return f"the database has {at}, not {head}: run `loraforge migrate` first"
