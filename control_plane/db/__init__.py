"""The database's infrastructure: engines and URLs (`engine`), migrations (`migrate`), and the
table models (`control_plane.db.tables`, imported from there).

Repositories (`jobs`, `queue`, `files`, `registry`, ...) build on this package; nothing here
knows what a job or an adapter is beyond its columns.
"""

from control_plane.db.engine import (
    libpq_url,
    make_engine,
    normalize_url,
    resolve_database_url,
    start_embedded_postgres,
)
from control_plane.db.migrate import (
    FOREIGN_TABLE_PREFIXES,
    alembic_config,
    downgrade,
    include_name,
    migrations_dir,
    schema_behind,
    upgrade,
)

__all__ = [
    "FOREIGN_TABLE_PREFIXES",
    "alembic_config",
    "downgrade",
    "include_name",
    "libpq_url",
    "make_engine",
    "migrations_dir",
    "normalize_url",
    "resolve_database_url",
    "schema_behind",
    "start_embedded_postgres",
    "upgrade",
]
