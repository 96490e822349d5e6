"""Registered base models: the frozen checkpoints that adapters are trained against."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Connection, Table, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from control_plane.base_status import BaseStatus
from control_plane.db.errors import breaks_unique_key
from control_plane.db.tables import BaseModelRow
from control_plane.ids import new_id
from control_plane.records import BaseModelRecord

# The unique key on bases' names, as revision 0001 names it.
_NAME_KEY = "uq_base_models_name"

base_models = cast(Table, BaseModelRow.__table__)

SOURCE_KINDS = ("gguf", "dir", "hub", "object")
# A Hugging Face hub id, `org/name` (written `hf://org/name` too).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def source_kind_of(source: str) -> str:
    """What a source string names, before anything is fetched (the import records the kind it
    found): an `s3://` URI, a `.gguf` file, a hub id like `org/name`, else a directory."""
    if source.startswith("s3://"):
        return "object"
    if source.lower().endswith(".gguf"):
        return "gguf"
    if HUB_ID.match(source.removeprefix("hf://")):
        return "hub"
    return "dir"


class BaseModelExistsError(Exception):
    pass


@dataclass(frozen=True)
class NewBaseModel:
    name: str
    source: str
    source_kind: str
    revision: str | None = None
    sha256: str | None = None
    architecture: str | None = None
    parameter_count: int | None = None
    has_chat_template: bool = False
    status: BaseStatus = BaseStatus.READY
    error_message: str | None = None


def register_base_model(conn: Connection, new: NewBaseModel) -> BaseModelRecord:
    """Insert a base; one `registering` records when its import was asked for."""
    requested = {"import_requested_at": func.now()} if new.status == BaseStatus.REGISTERING else {}
    try:
        with conn.begin_nested():
            row = conn.execute(
                insert(base_models)
                .values(id=new_id("base"), **new.__dict__, **requested)
                .returning(*base_models.c)
            ).one()
    except IntegrityError as exc:
        if not breaks_unique_key(exc, _NAME_KEY):
            raise
        raise BaseModelExistsError(
            f"a base model named {new.name!r} is already registered"
        ) from exc
    return BaseModelRecord.from_row(row)


def cleared_facts() -> dict[str, object]:
    """The checkpoint facts of a base whose import starts again (an earlier try failed)."""
    return {
        "sha256": None,
        "architecture": None,
        "parameter_count": None,
        "has_chat_template": False,
        "error_message": None,
    }


def update_base_model(conn: Connection, base_id: str, **values: object) -> BaseModelRecord:
    row = conn.execute(
        update(base_models)
        .where(base_models.c.id == base_id)
        .values(**values)
        .returning(*base_models.c)
    ).one()
    return BaseModelRecord.from_row(row)


def get_base_model(conn: Connection, name_or_id: str) -> BaseModelRecord | None:
    row = conn.execute(
        select(base_models).where(
            or_(base_models.c.name == name_or_id, base_models.c.id == name_or_id)
        )
    ).one_or_none()
    return BaseModelRecord.from_row(row) if row else None


def list_base_models(conn: Connection) -> list[BaseModelRecord]:
    rows = conn.execute(select(base_models).order_by(base_models.c.created_at)).all()
    return [BaseModelRecord.from_row(r) for r in rows]
