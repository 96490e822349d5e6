"""/v1/adapters: the adapter registry over HTTP.

Adapters and their versions (by number, alias or `latest`), lineage, files (presigned S3 URLs,
or streamed by the API where the store has no such URLs), aliases and their history, version
deletion, and the serving-cluster index with an ETag so that an unchanged poll costs a 304.
Everything is scoped to the caller's tenant: another tenant's adapter is a 404.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from control_plane import registry
from control_plane.api import signed_urls
from control_plane.api.adapter_schemas import (
    AdapterPublic,
    AliasDeleted,
    AliasEventPublic,
    AliasPublic,
    AliasUpdate,
    FileDownload,
    FileList,
    LineagePublic,
    ServingIndexPublic,
    VersionDeleted,
    VersionFromCheckpoint,
    VersionPublic,
)
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer
from control_plane.api.downloads import verified_download
from control_plane.api.errors import ApiError
from control_plane.api.openapi import download, refusals
from control_plane.api.schemas import Page, page_of
from control_plane.storage import ObjectNotFoundError

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
log = logging.getLogger(__name__)

PRESIGN_SECONDS = 300
VersionNumber = Annotated[int, Path(ge=1, le=registry.MAX_VERSION)]
# Path parameters documented with the registry's name rules (which decide: a name they refuse
# is a 400 `invalid_name` naming the rule broken).
AdapterName = Annotated[
    str,
    Path(
        description="the adapter's name (not `index`, no `..`)",
        json_schema_extra={"pattern": registry.NAME_SHAPE},
    ),
]
AliasName = Annotated[
    str,
    Path(
        description="an alias: not `latest`, not all digits, no `..`",
        json_schema_extra={"pattern": registry.ALIAS_SHAPE},
    ),
]
VersionRef = Annotated[
    str,
    Path(
        description="a version number, an alias, or `latest`",
        json_schema_extra={"pattern": registry.ALIAS_SHAPE},
    ),
]

_STATUS: dict[type[registry.RegistryError], int] = {
    registry.AdapterNotFoundError: 404,
    registry.VersionNotFoundError: 404,
    registry.AliasNotFoundError: 404,
    registry.BaseModelNotFoundError: 404,
    registry.CheckpointNotFoundError: 404,
    registry.VersionInUseError: 409,
    registry.BaseModelMismatchError: 409,
    registry.StoreUnavailableError: 503,
}


@contextmanager
def registry_errors() -> Iterator[None]:
    """Map the registry's refusals to API errors with the same stable codes."""
    try:
        yield
    except registry.RegistryError as exc:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
        raise ApiError(status, exc.code, exc.message, exc.param) from None


# --------------------------------------------------------------------------- routes


_NO_CACHE = {"Cache-Control": "no-cache"}


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get("", response_model=Page[AdapterPublic])
def list_adapters(
    conn: ConnDep,
    caller: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
) -> Page[AdapterPublic]:
    """The tenant's adapters, by name; `after` is the name of the last one on the last page."""
    found, more = registry.list_adapters(conn, caller.tenant_id, after=after, limit=limit)
    return page_of([AdapterPublic.of(a) for a in found], has_more=more, cursor=lambda a: a.name)


@router.get("/index", response_model=ServingIndexPublic, responses=refusals(304, 404))
def serving_index(
    conn: ConnDep,
    caller: Caller,
    base_model: Annotated[str, Query(min_length=1, max_length=200)],
    alias: Annotated[str, Query(min_length=1, max_length=registry.ALIAS_MAX)] = registry.LATEST,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """What a serving cluster of `base_model` should load: for each adapter, the version
    `alias` points at (or the latest). Poll with `If-None-Match: <ETag>`: 304 when unchanged,
    found from the versions' names, numbers and ids alone (not their files and lineage)."""
    with registry_errors():
        if if_none_match is not None:
            etag = f'"{registry.serving_etag(conn, caller.tenant_id, base_model, alias)}"'
            if _etag_matches(if_none_match, etag):
                return Response(status_code=304, headers={"ETag": etag, **_NO_CACHE})
        index = registry.serving_index(conn, caller.tenant_id, base_model, alias)
    headers = {"ETag": f'"{index.etag}"', **_NO_CACHE}
    body = ServingIndexPublic(
        base_model=index.base_model,
        alias=index.alias,
        etag=index.etag,
        data=[VersionPublic.of(v) for v in index.versions],
    )
    return JSONResponse(body.model_dump(mode="json"), headers=headers)


@router.get("/{name}", response_model=AdapterPublic)
def retrieve_adapter(name: AdapterName, conn: ConnDep, caller: Caller) -> AdapterPublic:
    with registry_errors():
        return AdapterPublic.of(registry.get_adapter(conn, caller.tenant_id, name))


@router.get("/{name}/versions", response_model=Page[VersionPublic])
def list_versions(
    name: AdapterName,
    conn: ConnDep,
    caller: Caller,
    after: Annotated[int | None, Query(ge=1, le=registry.MAX_VERSION)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[VersionPublic]:
    """Newest first; `after` is the version number of the last one on the previous page."""
    with registry_errors():
        found, more = registry.list_versions(
            conn, caller.tenant_id, name, before=after, limit=limit
        )
    return page_of(
        [VersionPublic.of(v) for v in found], has_more=more, cursor=lambda v: str(v.version)
    )


@router.post(
    "/{name}/versions",
    response_model=VersionPublic,
    status_code=201,
    responses={200: {"model": VersionPublic}, **refusals(404, 409, 503)},
)
def publish_from_checkpoint(
    name: AdapterName,
    body: VersionFromCheckpoint,
    response: Response,
    caller: Writer,
    services: ServicesDep,
) -> VersionPublic:
    """Publish saved session weights as the adapter's next version (the adapter is created on
    its first). A checkpoint becomes one version: publishing it again answers that version
    (200), whatever name is asked for."""
    with registry_errors():
        published = registry.publish_checkpoint(
            services, tenant_id=caller.tenant_id, path=body.from_checkpoint, adapter_name=name
        )
    if not published.created:
        response.status_code = 200
    return VersionPublic.of(published.version)


@router.get("/{name}/versions/{ref}", response_model=VersionPublic)
def retrieve_version(
    name: AdapterName, ref: VersionRef, conn: ConnDep, caller: Caller
) -> VersionPublic:
    """A version by number, alias, or `latest`."""
    with registry_errors():
        return VersionPublic.of(registry.resolve_version(conn, caller.tenant_id, name, ref))


@router.get("/{name}/versions/{ref}/lineage", response_model=LineagePublic)
def version_lineage(
    name: AdapterName, ref: VersionRef, conn: ConnDep, caller: Caller
) -> LineagePublic:
    """Everything the version was made from, exactly as the trainer recorded it."""
    with registry_errors():
        v = registry.resolve_version(conn, caller.tenant_id, name, ref)
    return LineagePublic(id=v.id, adapter=v.adapter_name, version=v.number, lineage=v.lineage)


@router.get("/{name}/versions/{ref}/files", response_model=FileList)
def version_files(
    name: AdapterName,
    ref: VersionRef,
    request: Request,
    conn: ConnDep,
    caller: Caller,
    services: ServicesDep,
    expires_in: Annotated[int, Query(ge=1, le=3600)] = PRESIGN_SECONDS,
) -> FileList:
    """Where to download each file: a short-lived presigned URL on S3, else this API."""
    with registry_errors():
        v = registry.resolve_version(conn, caller.tenant_id, name, ref)
    api = signed_urls.api_base(request, services)
    data = []
    for f in v.files:
        presigned = services.store.presigned_url(v.object_prefix + f["name"], expires_in)
        if presigned is not None:
            data.append(FileDownload(**f, url=presigned, via="presigned", expires_in=expires_in))
        else:
            url = f"{api}/v1/adapters/{v.adapter_name}/versions/{v.number}/files/{f['name']}"
            data.append(FileDownload(**f, url=url, via="api", expires_in=None))
    return FileList(adapter=v.adapter_name, version=v.number, data=data)


@router.get(
    "/{name}/versions/{number}/files/{filename}",
    response_class=Response,
    responses={**download("application/octet-stream"), **refusals(410, 502)},
)
def download_file(
    name: AdapterName,
    number: VersionNumber,
    filename: str,
    conn: ConnDep,
    caller: Caller,
    services: ServicesDep,
) -> Response:
    """The file's bytes, streamed; never a complete 200 unless they match their sha256
    (`X-Content-SHA256`): see `control_plane.api.downloads`."""
    with registry_errors():
        v = registry.resolve_version(conn, caller.tenant_id, name, number)
    f = v.file(filename)
    if f is None:
        raise ApiError(404, "file_not_found", f"{v.model_id} has no file {filename!r}")
    try:
        return verified_download(
            services.store,
            v.object_prefix + f["name"],
            sha256=f["sha256"],
            size=f["size"],
            filename=f["name"],
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{f["name"]}"'},
        )
    except ObjectNotFoundError:
        raise ApiError(
            410, "file_gone", f"{v.model_id}: {filename} is missing from the object store"
        ) from None


@router.delete("/{name}/versions/{ref}", response_model=VersionDeleted, responses=refusals(409))
def delete_version(
    name: AdapterName, ref: VersionNumber, conn: ConnDep, caller: Writer, services: ServicesDep
) -> VersionDeleted:
    """Delete a version and its objects; refused (409) while an alias points at it."""
    with registry_errors():
        v = registry.delete_version(conn, caller.tenant_id, name, ref)
    conn.commit()
    removed = True
    try:
        registry.remove_version_objects(services.store, v.object_prefix)
    except Exception:
        log.warning("objects of %s stay behind", v.object_prefix, exc_info=True)
        removed = False
    return VersionDeleted(
        id=v.id, adapter=v.adapter_name, version=v.number, objects_removed=removed
    )


@router.get("/{name}/aliases", response_model=Page[AliasPublic])
def list_aliases(name: AdapterName, conn: ConnDep, caller: Caller) -> Page[AliasPublic]:
    with registry_errors():
        found = registry.list_aliases(conn, caller.tenant_id, name)
    return page_of([AliasPublic.of(a) for a in found])


@router.put("/{name}/aliases/{alias}", response_model=AliasPublic, responses=refusals(409))
def set_alias(
    name: AdapterName,
    alias: AliasName,
    body: AliasUpdate,
    conn: ConnDep,
    caller: Writer,
    services: ServicesDep,
) -> AliasPublic:
    """Create or move an alias; the move is recorded with the calling key and the time."""
    with registry_errors():
        record = registry.set_alias(
            conn,
            services.store,
            tenant_id=caller.tenant_id,
            adapter_name=name,
            alias=alias,
            version=body.version,
            actor_key_id=caller.key_id,
        )
    conn.commit()
    return AliasPublic.of(record)


@router.delete("/{name}/aliases/{alias}", response_model=AliasDeleted)
def delete_alias(
    name: AdapterName, alias: AliasName, conn: ConnDep, caller: Writer, services: ServicesDep
) -> AliasDeleted:
    with registry_errors():
        registry.delete_alias(
            conn,
            services.store,
            tenant_id=caller.tenant_id,
            adapter_name=name,
            alias=alias,
            actor_key_id=caller.key_id,
        )
    conn.commit()
    return AliasDeleted(adapter=name, name=alias)


@router.get("/{name}/aliases/{alias}/history", response_model=Page[AliasEventPublic])
def alias_history(
    name: AdapterName, alias: AliasName, conn: ConnDep, caller: Caller
) -> Page[AliasEventPublic]:
    """Every set, move and delete of the alias, oldest first (kept after the alias is gone)."""
    with registry_errors():
        found = registry.alias_history(conn, caller.tenant_id, name, alias)
    return page_of([AliasEventPublic.of(e) for e in found])
