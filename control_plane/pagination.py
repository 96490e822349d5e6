"""Keyset pagination, written once: pages of rows continue past a cursor, never an offset.

A page asks for `limit + 1` rows; the extra row only says whether another page follows
(`has_more`), so a client never needs a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Row, Table, select, tuple_

T = TypeVar("T")


def trim(rows: Sequence[T], limit: int) -> tuple[list[T], bool]:
    """The first `limit` of `limit + 1` fetched rows, and whether there were more."""
    return list(rows[:limit]), len(rows) > limit


def newest_first(
    conn: Connection,
    table: Table,
    *,
    scope: ColumnElement[bool],
    filters: Sequence[ColumnElement[bool]] = (),
    after: str | None,
    limit: int,
) -> tuple[list[Row[Any]], bool]:
    """A page of `table`'s rows within `scope` (and `filters`), newest first by
    `(created_at, id)`; `after` is the id of the last row of the previous page.

    The cursor must be a row within `scope` (a tenant's own), else `LookupError`: another
    tenant's id is as unknown as a made-up one. It may be filtered out of the listing (a
    deleted file), and the page still continues after it.
    """
    query = select(table).where(scope, *filters)
    if after is not None:
        cursor = conn.execute(
            select(table.c.created_at, table.c.id).where(table.c.id == after, scope)
        ).one_or_none()
        if cursor is None:
            raise LookupError(after)
        # One row comparison, not `a < x OR (a = x AND b < y)`: an index on (scope...,
        # created_at, id) seeks straight to the cursor instead of filtering every newer row.
        query = query.where(
            tuple_(table.c.created_at, table.c.id) < tuple_(cursor.created_at, cursor.id)
        )
    rows = conn.execute(
        query.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit + 1)
    ).all()
    return trim(rows, limit)
