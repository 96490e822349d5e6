"""/v1/base_models: register (admin) and list the frozen bases adapters are trained on."""

from __future__ import annotations

from fastapi import APIRouter

from control_plane import base_models
from control_plane.api.deps import Admin, Caller, ConnDep
from control_plane.api.errors import ApiError, not_found
from control_plane.api.schemas import BaseModelCreate, BaseModelPublic, Page

router = APIRouter(prefix="/v1/base_models", tags=["base-models"])


@router.post("", response_model=BaseModelPublic)
def register_base_model(body: BaseModelCreate, conn: ConnDep, caller: Admin) -> BaseModelPublic:
    try:
        record = base_models.register_base_model(
            conn, base_models.NewBaseModel(**body.model_dump())
        )
    except base_models.BaseModelExistsError as exc:
        raise ApiError(409, "base_model_exists", str(exc), "name") from None
    conn.commit()
    return BaseModelPublic.of(record)


@router.get("", response_model=Page)
def list_base_models(conn: ConnDep, caller: Caller) -> Page:
    return Page(data=[BaseModelPublic.of(b) for b in base_models.list_base_models(conn)])


@router.get("/{name:path}", response_model=BaseModelPublic)
def retrieve_base_model(name: str, conn: ConnDep, caller: Caller) -> BaseModelPublic:
    record = base_models.get_base_model(conn, name)
    if record is None:
        raise not_found("base_model", name)
    return BaseModelPublic.of(record)
