"""The batches' runner (`control_plane.batches`): one pass steps every batch still moving, in a
transaction of its own that holds the batch's row (`SKIP LOCKED`: two passes never step one
batch at once, and a pass that fails leaves it as it was, its calls unasked).

A step collects the requests whose calls are over (each call's payload let go once read), asks
the next pending ones until `window` requests are in flight (in the tenant's chat session, as
a chat or a completion is asked, so they are batched, metered and shown as chats are; a base no
live executor holds leaves them pending, to be asked by a later pass), and once no request is
left writes the output and error files in the same transaction. A request refused by the
executor is answered as its endpoint would have refused it (400, in the error file); one the
platform failed (its executor lost) is asked again, up to MAX_ATTEMPTS. A batch cancelling, or
past its window, withdraws what no executor took yet, waits for what runs, and ends with what
was answered; each request never answered is in the error file with `batch_cancelled` or
`batch_expired`.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, select, text, update

from control_plane import audit, chat_completions, interactive, interactive_polls
from control_plane import files as file_repo
from control_plane.api.errors import ApiError, error_body
from control_plane.api.routes import chat, completions
from control_plane.api.routes.chat_models import ChatCompletionCreate
from control_plane.api.routes.completion_models import CompletionCreate
from control_plane.batches import MOVING, BatchRecord, batch_requests, batches
from control_plane.ids import new_id
from control_plane.interactive import CallRecord, CallStatus
from control_plane.services import Services
from control_plane.storage import file_key
from control_plane.tenants import Principal

log = logging.getLogger(__name__)

# Requests of one batch asked at once: enough to fill an executor's batch, few enough that the
# tenant's own chats are not queued behind thousands of a batch's calls.
WINDOW = 16
# Times a request is asked where the platform failed it (its executor lost).
MAX_ATTEMPTS = 3

Body = ChatCompletionCreate | CompletionCreate


def parse(endpoint: str, body: dict[str, Any]) -> Body:
    """A request's body as its endpoint takes it; ApiError (400) naming what is refused."""
    try:
        if endpoint == "/v1/chat/completions":
            chat_body = ChatCompletionCreate.model_validate(body)
            chat.refuse_unoffered(chat_body)
            parsed: Body = chat_body
        else:
            completion_body = CompletionCreate.model_validate(body)
            completions.refuse_unoffered(completion_body)
            parsed = completion_body
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, "invalid_request", f"{where}: {first['msg']}", where) from None
    if parsed.stream:
        raise ApiError(
            400,
            "invalid_request",
            "stream is not taken in a batch: its answers are written to its output file",
            "stream",
        )
    return parsed


def _sample_requests(body: Body) -> list[dict[str, Any]]:
    if isinstance(body, CompletionCreate):
        return body.sample_requests()
    return [body.sample_request()]


def _answer(body: Body, calls: list[CallRecord]) -> dict[str, Any]:
    if isinstance(body, CompletionCreate):
        return completions.answer(body, calls).model_dump(mode="json")
    return chat.answer(body, calls[0]).model_dump(mode="json")


def run_due(services: Services, window: int = WINDOW) -> int:
    """One pass over the batches still moving, each stepped once; how many were. A batch whose
    step fails is logged and left as it was for the next pass."""
    with services.engine.connect() as conn:
        ids = list(
            conn.execute(
                select(batches.c.id)
                .where(batches.c.status.in_(MOVING))
                .order_by(batches.c.created_at)
            ).scalars()
        )
    stepped = 0
    for batch_id in ids:
        written: list[str] = []
        try:
            with services.engine.begin() as conn:
                row = conn.execute(
                    select(batches)
                    .where(batches.c.id == batch_id, batches.c.status.in_(MOVING))
                    .with_for_update(skip_locked=True)
                ).one_or_none()
                if row is None:  # another pass steps it, or it ended meanwhile
                    continue
                _Step(services, conn, BatchRecord.from_row(row), written).run(window)
            stepped += 1
        except Exception:
            for key in written:  # files of a finish that did not commit
                services.store.delete(key)
            log.exception("batch %s: its step failed; the next pass steps it again", batch_id)
    return stepped


def _line_id(batch: BatchRecord, line: int) -> str:
    return f"batch_req-{batch.id.removeprefix('batch-')}-{line}"


class _Step:
    """One step of one batch, in the transaction holding its row."""

    def __init__(
        self, services: Services, conn: Connection, batch: BatchRecord, written: list[str]
    ) -> None:
        self.services = services
        self.conn = conn
        self.batch = batch
        self.written = written
        self.completed = 0
        self.failed = 0
        self.ending: str | None = None  # why it ends before its requests ran: an error's code

    def run(self, window: int) -> None:
        batch, conn = self.batch, self.conn
        if batch.status == "cancelling":
            self.ending = "batch_cancelled"
        elif conn.execute(text("SELECT now() >= :at"), {"at": batch.expires_at}).scalar_one():
            self.ending = "batch_expired"
        in_flight = sum(not self._collect(one) for one in self._requests("asked"))
        if self.ending is None:
            self._ask(window - in_flight)
        else:
            self._end_pending()
        conn.execute(
            update(batches)
            .where(batches.c.id == batch.id)
            .values(
                completed=batches.c.completed + self.completed,
                failed=batches.c.failed + self.failed,
            )
        )
        if not self._requests("asked", 1) and not self._requests("pending", 1):
            self._finish()

    def _requests(self, status: str, limit: int | None = None) -> list[Any]:
        return list(
            self.conn.execute(
                select(batch_requests)
                .where(batch_requests.c.batch_id == self.batch.id)
                .where(batch_requests.c.status == status)
                .order_by(batch_requests.c.line)
                .limit(limit)
            ).all()
        )

    def _settle(self, line: int, **values: Any) -> None:
        self.conn.execute(
            update(batch_requests)
            .where(batch_requests.c.batch_id == self.batch.id, batch_requests.c.line == line)
            .values(**values)
        )
        if values.get("status") == "done":
            self.completed += 1
        elif values.get("status") == "failed":
            self.failed += 1

    def _collect(self, request: Any) -> bool:
        """The asked request settled if its calls are over (or withdrawn, the batch ending):
        whether it no longer runs."""
        tenant = self.batch.tenant_id
        calls: list[CallRecord] = []
        for call_id, _ in request.calls:
            try:
                calls.append(interactive.retrieve(self.conn, tenant, call_id))
            except interactive.NotFound:  # its session's rows deleted meanwhile
                self._settle(request.line, status="failed", response=_failure("its call is gone"))
                return True
        withdrawn = request.error
        if self.ending is not None:
            for call in calls:
                if not call.finished and interactive.cancel(self.conn, tenant, call.id):
                    withdrawn = _ended(self.ending)
            calls = [interactive.retrieve(self.conn, tenant, call.id) for call in calls]
        if not all(call.finished for call in calls):
            if withdrawn is not None and request.error is None:  # remembered for later passes
                self._settle(request.line, error=withdrawn)
            return False
        for call_id, sampler_id in request.calls:
            interactive_polls.forget(self.conn, tenant, sampler_id, [call_id])
        if withdrawn is not None:
            self._settle(request.line, status="failed", error=withdrawn)
            return True
        request_id = calls[0].id
        lost = next((c for c in calls if c.payload_dropped_at is not None), None)
        failed = next((c for c in calls if c.status == CallStatus.FAILED), None)
        if lost is not None:
            message = "its answer was let go before it was read"
            self._settle(request.line, status="failed", response=_failure(message, request_id))
        elif failed is not None and (failed.error or {}).get("category") == "user":
            message = str((failed.error or {}).get("error") or "the request was refused")
            body = error_body(400, "invalid_request", message)
            response = {"status_code": 400, "request_id": request_id, "body": body}
            self._settle(request.line, status="failed", response=response)
        elif failed is not None and request.attempts < MAX_ATTEMPTS and self.ending is None:
            self._settle(request.line, status="pending", calls=None)  # asked again
        elif failed is not None:
            message = str((failed.error or {}).get("error") or "the executor failed")
            self._settle(request.line, status="failed", response=_failure(message, request_id))
        else:
            asked = parse(self.batch.endpoint, request.body)
            response = {"status_code": 200, "request_id": request_id, "body": _answer(asked, calls)}
            self._settle(request.line, status="done", response=response)
        return True

    def _ask(self, room: int) -> None:
        """Up to `room` pending requests asked, in their lines' order."""
        if room <= 0:
            return
        batch, conn = self.batch, self.conn
        lease = self.services.settings.lease_seconds
        audited = False
        for request in self._requests("pending", room):
            try:
                body = parse(batch.endpoint, request.body)
                with conn.begin_nested():
                    asked = [
                        chat_completions.ask(conn, batch.tenant_id, batch.model, one, lease)
                        for one in _sample_requests(body)
                    ]
            except ApiError as refused:
                body_of = error_body(refused.status, refused.code, refused.message, refused.param)
                response = {"status_code": refused.status, "request_id": None, "body": body_of}
                self._settle(request.line, status="failed", response=response)
                continue
            except chat_completions.ModelUnknown as unknown:
                body_of = error_body(404, "model_not_found", str(unknown), "model")
                response = {"status_code": 404, "request_id": None, "body": body_of}
                self._settle(request.line, status="failed", response=response)
                continue
            except chat_completions.NoExecutor:  # asked by a later pass, once one runs
                return
            self._settle(
                request.line,
                status="asked",
                calls=[[one.call_id, one.sampler_id] for one in asked],
                attempts=request.attempts + 1,
            )
            weights = asked[0].weights
            if weights is not None and not audited:
                actor = Principal(batch.tenant_id, batch.created_by, "member")
                audit.checkpoint_read(conn, actor, weights, "batch")
                audited = True

    def _end_pending(self) -> None:
        assert self.ending is not None
        ended = self.conn.execute(
            update(batch_requests)
            .where(batch_requests.c.batch_id == self.batch.id)
            .where(batch_requests.c.status == "pending")
            .values(status="failed", error=_ended(self.ending))
        )
        self.failed += ended.rowcount

    def _finish(self) -> None:
        """The output and error files written and the batch over, in this transaction."""
        batch, conn = self.batch, self.conn
        output, errors = io.BytesIO(), io.BytesIO()
        counts = {"output": 0, "error": 0}
        rows = conn.execute(
            select(batch_requests)
            .where(batch_requests.c.batch_id == batch.id)
            .order_by(batch_requests.c.line)
        )
        for row in rows:
            entry = {
                "id": _line_id(batch, row.line),
                "custom_id": row.custom_id,
                "response": row.response,
                "error": row.error,
            }
            kind = "output" if row.status == "done" else "error"
            (output if kind == "output" else errors).write(json.dumps(entry).encode() + b"\n")
            counts[kind] += 1
        made: dict[str, str | None] = {"output": None, "error": None}
        for kind, data in (("output", output), ("error", errors)):
            if not counts[kind]:
                continue
            file_id = new_id("file")
            key = file_key(batch.tenant_id, file_id)
            info = self.services.store.put_bytes(key, data.getvalue(), write_once=True)
            self.written.append(key)
            file_repo.insert_file(
                conn,
                file_id=file_id,
                tenant_id=batch.tenant_id,
                filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output",
                size=info.size,
                sha256=info.sha256,
                object_key=key,
                format="batch_output",
                examples=counts[kind],
                tokens=None,
            )
            made[kind] = file_id
        status = {"batch_cancelled": "cancelled", "batch_expired": "expired"}.get(
            self.ending or "", "completed"
        )
        conn.execute(
            update(batches)
            .where(batches.c.id == batch.id)
            .values(
                status=status,
                output_file_id=made["output"],
                error_file_id=made["error"],
                finalizing_at=text("now()"),
                **{f"{status}_at": text("now()")},
            )
        )


def _failure(message: str, request_id: str | None = None) -> dict[str, Any]:
    """The platform's failure of a request, as its endpoint answers one (503)."""
    body = error_body(503, "executor_failed", message)
    return {"status_code": 503, "request_id": request_id, "body": body}


def _ended(code: str) -> dict[str, str]:
    why = "cancelled" if code == "batch_cancelled" else "past its completion window"
    return {"code": code, "message": f"the batch was {why} before this request was answered"}
