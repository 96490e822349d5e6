"""What a database error was: a repository maps only the violation it means to a refusal of its
own and lets any other go up as it is."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import IntegrityError


def breaks_unique_key(exc: IntegrityError, key: str) -> bool:
    """Whether the statement broke the unique key `key` (SQLSTATE 23505 on that constraint), not
    another constraint of the table (a check, a foreign key, a NOT NULL)."""
    found = exc.orig
    return isinstance(found, psycopg.errors.UniqueViolation) and found.diag.constraint_name == key
