"""GET /v1/fine_tuning/jobs/{id}/events/stream: a job's events as Server-Sent Events.

Each job event is sent as `event: event` with the same JSON as `GET .../events` and its id as
the SSE id, oldest first; `event: status` whenever the job's status, progress or tokens move;
`event: done` once the job is over and every event was sent, after which the stream ends. A
client resumes with `Last-Event-ID` (or `?after=ftevent-N`); without either, the stream starts
at the job's first event. See `control_plane.api.sse` for how streams read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from control_plane import jobs
from control_plane.api import sse
from control_plane.api.deps import Caller, ServicesDep
from control_plane.api.errors import not_found
from control_plane.api.schemas import EventPublic
from control_plane.api.stream_watch import StreamWatchDep
from control_plane.records import JobRecord

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def job_status(job: JobRecord) -> dict[str, Any]:
    """The live part of a job, as a stream's `status` event carries it."""
    return {
        "id": job.id,
        "status": str(job.status),
        "progress": job.progress,
        "trained_tokens": job.trained_tokens,
        "eta_seconds": job.eta_seconds,
        "fine_tuned_model": job.fine_tuned_model,
        "error": (
            {"code": job.error_code, "message": job.error_message, "param": job.error_param}
            if job.error_code
            else None
        ),
    }


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {sse.MEDIA_TYPE: {}}, "description": "Server-Sent Events"}},
)
async def stream_events(
    job_id: str,
    request: Request,
    caller: Caller,
    services: ServicesDep,
    watch: StreamWatchDep,
    after: str | None = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    def owned() -> bool:
        with services.engine.connect() as conn:
            return jobs.get_job(conn, caller.tenant_id, job_id) is not None

    if not await run_in_threadpool(owned):
        raise not_found("fine_tuning_job", job_id)
    cursor = sse.parse_event_id(last_event_id) or sse.parse_event_id(after)

    async def body() -> AsyncIterator[str]:
        async for change in sse.follow_job(
            services, watch, caller.tenant_id, job_id, cursor, request.is_disconnected
        ):
            if change is None:
                yield sse.comment()
                continue
            for event in change.events:
                public = EventPublic.of(event)
                yield sse.json_frame(public.model_dump(mode="json"), event="event", id=public.id)
            yield sse.json_frame(job_status(change.job), event="status")
            if change.final:
                yield sse.json_frame(job_status(change.job), event="done")

    return StreamingResponse(body(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
