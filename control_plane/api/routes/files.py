"""/v1/files: upload (multipart, streamed), list, retrieve, delete, content."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import Response

from control_plane import batches, jobs
from control_plane import files as file_repo
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer
from control_plane.api.downloads import file_download
from control_plane.api.errors import ApiError, not_found
from control_plane.api.openapi import download, refusals
from control_plane.api.schemas import FileDeleted, FilePublic, Page, page_of
from control_plane.datasets import DatasetError, DatasetStats, validate_jsonl
from control_plane.ids import new_id
from control_plane.settings import Settings
from control_plane.storage import ObjectNotFoundError, file_key

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FilePublic)
def upload_file(
    services: ServicesDep,
    caller: Writer,
    file: UploadFile,
    purpose: Annotated[str, Form(json_schema_extra={"enum": sorted(file_repo.PURPOSES)})],
) -> FilePublic:
    """Validate a JSONL dataset (or a batch's requests) and store it; nothing is kept when it
    is refused."""
    if purpose not in file_repo.PURPOSES:
        raise ApiError(
            400,
            "invalid_purpose",
            f"purpose must be 'fine-tune' or 'batch', not {purpose!r}",
            "purpose",
        )
    filename = (file.filename or "upload.jsonl").replace("/", "_").replace("\\", "_")[:255]
    settings = services.settings
    stats = (
        _batch_stats(file, filename, min(settings.max_upload_bytes, batches.MAX_BYTES))
        if purpose == "batch"
        else _dataset_stats(file, filename, settings)
    )
    file.file.seek(0)
    file_id = new_id("file")
    key = file_key(caller.tenant_id, file_id)
    info = services.store.put_stream(
        key, file.file, max_bytes=settings.max_upload_bytes, write_once=True
    )
    try:
        with services.engine.begin() as conn:
            record = file_repo.insert_file(
                conn,
                file_id=file_id,
                tenant_id=caller.tenant_id,
                filename=filename,
                purpose=purpose,
                size=info.size,
                sha256=info.sha256,
                object_key=key,
                format=stats.format,
                examples=stats.examples,
                tokens=stats.tokens,
            )
    except Exception:
        services.store.delete(key)
        raise
    return FilePublic.of(record)


def _dataset_stats(file: UploadFile, filename: str, settings: Settings) -> DatasetStats:
    try:
        return validate_jsonl(
            file.file,
            max_bytes=settings.max_upload_bytes,
            max_example_tokens=settings.max_example_tokens,
        )
    except DatasetError as exc:
        status = 413 if exc.code == "file_too_large" else 400
        raise ApiError(status, exc.code, f"{filename}: {exc.message}", "file") from exc


def _batch_stats(file: UploadFile, filename: str, max_bytes: int) -> _Counted:
    """A batch's requests, each line checked for its shape (`batches.read_input`; the bodies
    are checked when a batch is created, against its endpoint)."""
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "file_too_large", f"{filename}: larger than {max_bytes} bytes", "file")
    try:
        lines = batches.read_input(data)
    except batches.BatchInputError as bad:
        raise ApiError(400, "invalid_batch_input", f"{filename}: {bad}", "file") from None
    return _Counted(format="batch", examples=len(lines), tokens=None)


@dataclass(frozen=True)
class _Counted:
    """What a file's row says of its contents."""

    format: str
    examples: int
    tokens: int | None


@router.get("", response_model=Page[FilePublic], responses=refusals(404))
def list_files(
    conn: ConnDep,
    caller: Caller,
    services: ServicesDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
) -> Page[FilePublic]:
    try:
        found, more = file_repo.list_files(
            conn, caller.tenant_id, purpose=purpose, after=after, limit=limit
        )
    except LookupError:
        raise not_found("file", after or "", "after") from None
    return page_of([FilePublic.of(f) for f in found], has_more=more, cursor=lambda f: f.id)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, conn: ConnDep, caller: Caller) -> FilePublic:
    record = file_repo.get_file(conn, caller.tenant_id, file_id)
    if record is None:
        raise not_found("file", file_id)
    return FilePublic.of(record)


@router.delete("/{file_id}", response_model=FileDeleted, responses=refusals(409))
def delete_file(file_id: str, conn: ConnDep, caller: Writer, services: ServicesDep) -> FileDeleted:
    record = file_repo.get_file(conn, caller.tenant_id, file_id)
    if record is None:
        raise not_found("file", file_id)
    user = jobs.unfinished_job_using_file(conn, file_id)
    if user is not None:
        raise ApiError(
            409,
            "file_in_use",
            f"File {file_id} is used by job {user}, which has not finished; cancel it or wait.",
        )
    file_repo.mark_deleted(conn, caller.tenant_id, file_id)
    conn.commit()
    services.store.delete(record.object_key)
    return FileDeleted(id=file_id)


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={**download("application/jsonl"), **refusals(410, 502)},
)
def file_content(file_id: str, conn: ConnDep, caller: Caller, services: ServicesDep) -> Response:
    """The file's bytes, never a complete 200 unless they match their sha256
    (`X-Content-SHA256`); see `control_plane.api.downloads`."""
    record = file_repo.get_file(conn, caller.tenant_id, file_id)
    if record is None:
        raise not_found("file", file_id)
    try:
        return file_download(services.store, record)
    except ObjectNotFoundError:
        raise ApiError(
            410, "file_gone", f"File {file_id}: its bytes are missing from the object store"
        ) from None
