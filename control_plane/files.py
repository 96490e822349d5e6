"""Uploaded dataset files: rows in Postgres, bytes in the object store, scoped per tenant."""

from __future__ import annotations

from typing import cast

from sqlalchemy import ColumnElement, Connection, Table, func, insert, select, update

from control_plane.db.tables import File
from control_plane.pagination import newest_first
from control_plane.records import FileRecord

files = cast(Table, File.__table__)

# What an upload may be for: a dataset, or a batch's requests (`control_plane.batches`); a
# batch's output files (`batch_output`) are written by the platform alone.
PURPOSES = ("fine-tune", "batch")


def insert_file(
    conn: Connection,
    *,
    file_id: str,
    tenant_id: str,
    filename: str,
    purpose: str,
    size: int,
    sha256: str,
    object_key: str,
    format: str | None,
    examples: int | None,
    tokens: int | None,
) -> FileRecord:
    row = conn.execute(
        insert(files)
        .values(
            id=file_id,
            tenant_id=tenant_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=sha256,
            object_key=object_key,
            status="processed",
            format=format,
            examples=examples,
            tokens=tokens,
        )
        .returning(*files.c)
    ).one()
    return FileRecord.from_row(row)


def get_file(conn: Connection, tenant_id: str, file_id: str) -> FileRecord | None:
    row = conn.execute(
        select(files).where(
            files.c.id == file_id, files.c.tenant_id == tenant_id, files.c.deleted_at.is_(None)
        )
    ).one_or_none()
    return FileRecord.from_row(row) if row else None


def get_file_unscoped(conn: Connection, file_id: str) -> FileRecord | None:
    row = conn.execute(select(files).where(files.c.id == file_id)).one_or_none()
    return FileRecord.from_row(row) if row else None


def list_files(
    conn: Connection,
    tenant_id: str,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> tuple[list[FileRecord], bool]:
    """Newest first, deleted files left out; `after` is the id of the last file of the
    previous page."""
    filters: list[ColumnElement[bool]] = [files.c.deleted_at.is_(None)]
    if purpose is not None:
        filters.append(files.c.purpose == purpose)
    rows, more = newest_first(
        conn,
        files,
        scope=files.c.tenant_id == tenant_id,
        filters=filters,
        after=after,
        limit=limit,
    )
    return [FileRecord.from_row(r) for r in rows], more


def mark_deleted(conn: Connection, tenant_id: str, file_id: str) -> bool:
    """Soft delete: jobs and lineage keep referring to the id and its sha256."""
    result = conn.execute(
        update(files)
        .where(files.c.id == file_id, files.c.tenant_id == tenant_id, files.c.deleted_at.is_(None))
        .values(deleted_at=func.now())
    )
    return result.rowcount == 1
