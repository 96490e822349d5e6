"""`/v1/batches`: OpenAI's Batch API (`control_plane.batches`). The official `openai` SDK's
`client.batches.create(input_file_id=..., endpoint="/v1/chat/completions",
completion_window="24h")`, `retrieve`, `list` and `cancel` work unchanged, and the output file
is read with `client.files.content(batch.output_file_id)`.

A batch's file is checked whole when it is created: every line's body as its endpoint checks a
request (so a line that would be refused is a 400 naming the line, before anything runs), one
model for every line, as OpenAI asks, which must be one the tenant may chat with (404
otherwise); an alias (`bot@prod`), or an adapter's name alone, is pinned to the version it
names then, so every answer of a batch comes from one version (the batch's `model` says which). Its requests then run on the interactive executors, a
window at a time (`api.batch_runner`), beside the tenant's chats.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from control_plane import batches, chat_completions
from control_plane import files as file_repo
from control_plane.api.batch_bodies import parse
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer
from control_plane.api.errors import ApiError, not_found
from control_plane.api.openapi import refusals
from control_plane.api.schemas import Page, _ts, page_of
from control_plane.batches import BatchRecord
from control_plane.records import FileRecord
from control_plane.services import Services
from control_plane.storage import ObjectNotFoundError

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class BatchCreate(BaseModel):
    input_file_id: str = Field(max_length=64, description="a file uploaded with purpose `batch`")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str
    errors: None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: None = None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, b: BatchRecord) -> BatchPublic:
        return cls(
            id=b.id,
            endpoint=b.endpoint,
            model=b.model,
            input_file_id=b.input_file_id,
            completion_window=b.completion_window,
            status=b.status,
            output_file_id=b.output_file_id,
            error_file_id=b.error_file_id,
            created_at=_ts(b.created_at) or 0,
            in_progress_at=_ts(b.in_progress_at),
            expires_at=_ts(b.expires_at) or 0,
            finalizing_at=_ts(b.finalizing_at),
            completed_at=_ts(b.completed_at),
            expired_at=_ts(b.expired_at),
            cancelling_at=_ts(b.cancelling_at),
            cancelled_at=_ts(b.cancelled_at),
            request_counts=RequestCounts(total=b.total, completed=b.completed, failed=b.failed),
            metadata=b.metadata,
        )


def _lines(
    services: Services, record: FileRecord, endpoint: str
) -> tuple[str, list[batches.InputLine]]:
    """The file's requests, every one checked as its endpoint checks a request, and their one
    model; ApiError (400) naming the first line refused."""
    try:
        data = services.store.get_bytes(record.object_key, expected_sha256=record.sha256)
    except ObjectNotFoundError:
        raise ApiError(
            410, "file_gone", f"File {record.id}: its bytes are missing from the object store"
        ) from None
    try:
        lines = batches.read_input(data)
    except batches.BatchInputError as bad:
        raise ApiError(400, "invalid_batch_input", f"{record.id}: {bad}", "input_file_id") from None
    model: str | None = None
    for one in lines:
        where = f"{record.id}: line {one.line}"
        if one.url != endpoint:
            raise ApiError(
                400,
                "invalid_batch_input",
                f"{where}: url {one.url} is not the batch's endpoint {endpoint}",
                "input_file_id",
            )
        try:
            body = parse(endpoint, one.body)
        except ApiError as refused:
            raise ApiError(
                400, "invalid_batch_input", f"{where}: {refused.message}", "input_file_id"
            ) from None
        if model is not None and body.model != model:
            raise ApiError(
                400,
                "invalid_batch_input",
                f"{where}: model {body.model!r} is not the earlier lines' {model!r}: a batch "
                "asks one model",
                "input_file_id",
            )
        model = body.model
    assert model is not None  # read_input refuses a file with no request
    return model, lines


@router.post("", response_model=BatchPublic, responses=refusals(404, 410))
def create_batch(
    body: BatchCreate, conn: ConnDep, caller: Writer, services: ServicesDep
) -> BatchPublic:
    """A batch of the file's requests, in progress at once; nothing is written if any line is
    refused."""
    record = file_repo.get_file(conn, caller.tenant_id, body.input_file_id)
    if record is None:
        raise not_found("file", body.input_file_id, "input_file_id")
    if record.purpose != "batch":
        raise ApiError(
            400,
            "invalid_file_purpose",
            f"file {record.id} was uploaded with purpose {record.purpose!r}, not 'batch'",
            "input_file_id",
        )
    model, lines = _lines(services, record, body.endpoint)
    try:  # an alias, or an adapter's name alone, pinned to the version it names now
        pinned = chat_completions.pinned(conn, caller.tenant_id, model)
    except chat_completions.ModelUnknown as unknown:
        raise ApiError(404, "model_not_found", str(unknown), "input_file_id") from None
    created = batches.create(
        conn,
        tenant_id=caller.tenant_id,
        created_by=caller.key_id,
        endpoint=body.endpoint,
        input_file_id=record.id,
        window=body.completion_window,
        model=pinned,
        metadata=body.metadata,
        lines=lines,
    )
    conn.commit()
    return BatchPublic.of(created)


@router.get("", response_model=Page[BatchPublic], responses=refusals(404))
def list_batches(
    conn: ConnDep,
    caller: Caller,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[BatchPublic]:
    """The tenant's batches, newest first."""
    try:
        found, more = batches.list_batches(conn, caller.tenant_id, after=after, limit=limit)
    except LookupError:
        raise not_found("batch", after or "", "after") from None
    return page_of([BatchPublic.of(b) for b in found], has_more=more, cursor=lambda b: b.id)


@router.get("/{batch_id}", response_model=BatchPublic, responses=refusals(404))
def retrieve_batch(batch_id: str, conn: ConnDep, caller: Caller) -> BatchPublic:
    found = batches.get(conn, caller.tenant_id, batch_id)
    if found is None:
        raise not_found("batch", batch_id)
    return BatchPublic.of(found)


@router.post("/{batch_id}/cancel", response_model=BatchPublic, responses=refusals(404, 409))
def cancel_batch(batch_id: str, conn: ConnDep, caller: Writer) -> BatchPublic:
    """The batch `cancelling`: the runner withdraws the requests no executor took, waits for
    those running, and leaves it `cancelled`, its answers so far in its output file."""
    try:
        found = batches.request_cancel(conn, caller.tenant_id, batch_id)
    except batches.NotCancellable as over:
        raise ApiError(409, "batch_not_cancellable", str(over)) from None
    if found is None:
        raise not_found("batch", batch_id)
    conn.commit()
    return BatchPublic.of(found)
