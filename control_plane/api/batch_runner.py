"""The batches' runner (`control_plane.batches`): one pass steps every batch still moving, in a
transaction of its own that holds the batch's row (`SKIP LOCKED`: two passes never step one
batch at once, and a pass that fails leaves it as it was, its calls unasked).

A step collects the requests whose calls are over (each call's payload let go once read), asks
the next pending ones until `window` calls are in flight (in the tenant's chat session, as
a chat or a completion is asked, so they are batched, metered and shown as chats are; a base no
live executor holds leaves them pending, to be asked by a later pass), and once no request is
left writes the output and error files in the same transaction. A request refused by the
executor is answered as its endpoint would have refused it (400, in the error file); one the
platform failed (its executor lost, its answer let go unread) is asked MAX_ATTEMPTS times in
all. A batch cancelling, or
past its window, withdraws what no executor took yet, waits for what runs, and ends with what
was answered; each request never answered is in the error file with `batch_cancelled` or
`batch_expired`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any, BinaryIO, cast

from sqlalchemy import Connection, delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

from control_plane import audit, chat_completions, interactive, interactive_polls
from control_plane import files as file_repo
from control_plane.api import call_wakeups
from control_plane.api.batch_bodies import answer, parse, sample_requests
from control_plane.api.errors import ApiError, error_body
from control_plane.batches import MOVING, BatchRecord, batch_requests, batches, has_asked
from control_plane.ids import new_id
from control_plane.interactive import CallRecord, CallStatus
from control_plane.queue import QueueListener
from control_plane.services import Services
from control_plane.storage import file_key
from control_plane.tenants import Principal

log = logging.getLogger(__name__)

# Requests of one batch asked at once: enough to fill an executor's batch, few enough that the
# tenant's own chats are not queued behind thousands of a batch's calls.
WINDOW = 16
# Times a request is asked where the platform failed it (its executor lost).
MAX_ATTEMPTS = 3
# The runner's advisory lock (one runner steps the batches at a time), and how long it waits
# for a call's finish between passes.
LOCK_KEY = 0x6C66_6261_7463_68  # "lfbatch"
WAKE_SECONDS = 0.5
PASS_GAP_SECONDS = 0.2


def run_due(services: Services, window: int = WINDOW) -> int:
    """One pass over the batches still moving, each stepped once; how many were. A batch whose
    step fails is logged and left as it was for the next pass."""
    with services.engine.connect() as conn:
        moving = conn.execute(
            select(batches.c.id, batches.c.tenant_id)
            .where(batches.c.status.in_(MOVING))
            .order_by(batches.c.created_at)
        ).all()
    stepped = 0
    for batch_id, tenant_id in moving:
        written: list[str] = []
        try:
            with services.engine.begin() as conn:  # apart: the step holds no session's row
                if has_asked(conn, batch_id):
                    chat_completions.keep_alive(conn, tenant_id)
            with services.engine.begin() as conn:
                row = conn.execute(
                    select(batches, (func.now() >= batches.c.expires_at).label("past_window"))
                    .where(batches.c.id == batch_id, batches.c.status.in_(MOVING))
                    .with_for_update(of=batches, skip_locked=True)
                ).one_or_none()
                if row is None:  # another pass steps it, or it ended meanwhile
                    continue
                batch = BatchRecord.from_row(row)
                _Step(services, conn, batch, written, row.past_window).run(window)
            stepped += 1
        except Exception:
            for key in written:  # files of a finish that did not commit
                services.store.delete(key)
            log.exception("batch %s: its step failed; the next pass steps it again", batch_id)
    return stepped


def run_for(services: Services, seconds: float, window: int = WINDOW) -> int:
    """Passes for up to `seconds` while any batch moves, the next once a call finishes (its
    notification; streamed chats' writes notify too, so passes are PASS_GAP_SECONDS apart at
    least) or WAKE_SECONDS passed, by one runner of the platform at a time (an advisory lock:
    a second returns at once, 0); how many steps it made. The beat's task runs this, so a
    batch's next requests are asked as soon as the last ones are answered, not a beat later,
    and one worker's slot, not all, steps the batches. Behind a pooler that keeps no session
    (`tinker_wake_on_finish` off: no LISTEN, and a session's lock would not hold), one pass."""
    if not services.settings.tinker_wake_on_finish:
        return run_due(services, window)
    deadline = time.monotonic() + seconds
    with services.engine.connect() as held:
        if not held.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar():
            return 0
        held.commit()  # the lock is the session's: no transaction held open meanwhile
        try:
            steps = run_due(services, window)
            if not steps:  # nothing moves: no listener opened
                return 0
            with QueueListener(services.database_url, (call_wakeups.CHANNEL,)) as woken:
                while (left := deadline - time.monotonic()) > 0:
                    began = time.monotonic()
                    woken.wait(min(left, WAKE_SECONDS))
                    time.sleep(max(PASS_GAP_SECONDS - (time.monotonic() - began), 0.0))
                    stepped = run_due(services, window)
                    steps += stepped
                    if not stepped:
                        break
            return steps
        finally:
            held.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            held.commit()


def _line_id(batch: BatchRecord, line: int) -> str:
    return f"batch_req-{batch.id.removeprefix('batch-')}-{line}"


class _Step:
    """One step of one batch, in the transaction holding its row."""

    def __init__(
        self,
        services: Services,
        conn: Connection,
        batch: BatchRecord,
        written: list[str],
        past_window: bool,
    ) -> None:
        self.services = services
        self.conn = conn
        self.batch = batch
        self.written = written
        self.completed = 0
        self.failed = 0
        # Why it ends before its requests ran (an error's code), if it does.
        self.ending: str | None = None
        if batch.status == "cancelling":
            self.ending = "batch_cancelled"
        elif past_window:
            self.ending = "batch_expired"
        self.in_flight = 0  # calls asked and not yet collected
        self.audited = False  # the adapter's read written to its owner's log this step

    def run(self, window: int) -> None:
        batch, conn = self.batch, self.conn
        asked = self._requests("asked")
        for request in asked:
            if not self._guarded(request, self._collect):
                self.in_flight += len(request.calls)
        if self.ending is None:
            self._ask(window)
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
        if not self._requests("asked", "pending", limit=1):
            self._finish()

    def _guarded(self, request: Any, move: Callable[[Any], bool | None]) -> bool | None:
        """`move(request)` in a savepoint; a request it fails on (a bug, or data no answer can
        be made of) is failed alone (500), not the whole step every pass."""
        counts = (self.completed, self.failed)
        try:
            with self.conn.begin_nested():
                return move(request)
        except DBAPIError:
            raise  # the database's (a deadlock, a timeout, a lost connection): the step again
        except Exception:
            log.exception("batch %s, line %s: failed", self.batch.id, request.line)
            self.completed, self.failed = counts
            response = _response(500, "internal_error", "the platform could not run this request")
            self._settle(request.line, status="failed", response=response)
            return True

    def _requests(self, *statuses: str, limit: int | None = None) -> list[Any]:
        return list(
            self.conn.execute(
                select(batch_requests)
                .where(batch_requests.c.batch_id == self.batch.id)
                .where(batch_requests.c.status.in_(statuses))
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

    def _withdraw(self, call_ids: list[str]) -> bool:
        """The calls no executor took yet withdrawn: whether any was."""
        withdrawn = False
        for call_id in call_ids:
            try:
                withdrawn |= interactive.cancel(self.conn, self.batch.tenant_id, call_id)
            except interactive.NotFound:
                continue
        return withdrawn

    def _collect(self, request: Any) -> bool:
        """The asked request settled if its calls are over (or withdrawn, the batch ending):
        whether it no longer runs."""
        tenant = self.batch.tenant_id
        ids = [call_id for call_id, _ in request.calls]
        try:
            calls = [interactive.retrieve(self.conn, tenant, call_id) for call_id in ids]
        except interactive.NotFound:  # its session's rows deleted meanwhile
            self._withdraw(ids)
            response = _response(503, "executor_failed", "its call is gone")
            self._settle(request.line, status="failed", response=response)
            return True
        withdrawn = request.error
        refused = next((c for c in calls if _refused(c)), None)
        if (self.ending is not None or refused is not None) and self._withdraw(ids):
            # The batch ends, or a prompt of the request was refused: its others not run.
            withdrawn = withdrawn or (_ended(self.ending) if self.ending else None)
            calls = [interactive.retrieve(self.conn, tenant, call_id) for call_id in ids]
        if not all(call.finished for call in calls):
            if withdrawn is not None and request.error is None:  # remembered for later passes
                self._settle(request.line, error=withdrawn)
            return False
        for call_id, sampler_id in request.calls:
            interactive_polls.forget(self.conn, tenant, sampler_id, [call_id])
        request_id = calls[0].id
        if refused is not None:
            message = str((refused.error or {}).get("error") or "the request was refused")
            response = _response(400, "invalid_request", message, request_id=request_id)
            self._settle(request.line, status="failed", response=response, error=None)
            return True
        if withdrawn is not None:
            self._settle(request.line, status="failed", error=withdrawn)
            return True
        # The platform's failure: its executor lost, or its answer let go before it was read
        # (the runner held up past the payloads' retention).
        failed = next(
            (c for c in calls if c.status == CallStatus.FAILED or c.payload_dropped_at), None
        )
        if failed is not None and request.attempts < MAX_ATTEMPTS and self.ending is None:
            self._settle(request.line, status="pending", calls=None)  # asked again
        elif failed is not None:
            message = str(
                (failed.error or {}).get("error") or "its answer was let go before it was read"
            )
            response = _response(503, "executor_failed", message, request_id=request_id)
            self._settle(request.line, status="failed", response=response)
        else:
            asked = parse(self.batch.endpoint, request.body)
            response = {"status_code": 200, "request_id": request_id, "body": answer(asked, calls)}
            self._settle(request.line, status="done", response=response)
        return True

    def _ask(self, window: int) -> None:
        """The next pending requests asked, in their lines' order, while their calls fit in
        `window` beside those in flight (one request at least when none runs)."""
        for request in self._requests("pending", limit=max(window - self.in_flight, 1)):
            try:
                body = parse(self.batch.endpoint, request.body)
            except ApiError as refused:  # its endpoint's refusal (the checks changed since)
                response = _response(refused.status, refused.code, refused.message, refused.param)
                self._settle(request.line, status="failed", response=response)
                continue
            asks = sample_requests(body)
            if self.in_flight and self.in_flight + len(asks) > window:
                return
            if self._guarded(request, partial(self._ask_one, asks=asks)) is None:
                return  # no live executor holds the base: asked by a later pass

    def _ask_one(self, request: Any, asks: list[dict[str, Any]]) -> bool | None:
        """The request's calls (`asks`) asked, or it failed (its model unknown): False, as it
        runs now; True, as it is over; None where no executor holds the base."""
        batch, conn = self.batch, self.conn
        lease = self.services.settings.lease_seconds
        try:
            with conn.begin_nested():
                asked = [
                    chat_completions.ask(conn, batch.tenant_id, batch.model, one, lease)
                    for one in asks
                ]
        except chat_completions.ModelUnknown as unknown:
            response = _response(404, "model_not_found", str(unknown), "model")
            self._settle(request.line, status="failed", response=response)
            return True
        except chat_completions.NoExecutor:
            return None
        self._settle(
            request.line,
            status="asked",
            calls=[[one.call_id, one.sampler_id] for one in asked],
            attempts=request.attempts + 1,
        )
        self.in_flight += len(asked)
        weights = asked[0].weights
        if weights is not None and not self.audited:
            actor = Principal(batch.tenant_id, batch.created_by, "member")
            audit.checkpoint_read(conn, actor, weights, "batch")
            self.audited = True
        return False

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
        """The output and error files written and the batch over, in this transaction; its
        requests' rows, whose prompts and answers the files now hold, deleted."""
        batch, conn = self.batch, self.conn
        with _spooled() as output, _spooled() as errors:
            counts = {"output": 0, "error": 0}
            rows = conn.execute(
                select(batch_requests)
                .where(batch_requests.c.batch_id == batch.id)
                .order_by(batch_requests.c.line),
                execution_options={"yield_per": 500},
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
                data.seek(0)
                info = self.services.store.put_stream(key, data, write_once=True)
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
        conn.execute(delete(batch_requests).where(batch_requests.c.batch_id == batch.id))


def _refused(call: CallRecord) -> bool:
    """The executor refused the call's request (the user's to change): not failed it, nor was
    it withdrawn."""
    error = call.error or {}
    return (
        call.status == CallStatus.FAILED
        and error.get("category") == "user"
        and error.get("error") != interactive.WITHDRAWN
    )


def _spooled() -> BinaryIO:
    """Where a file is written before it is stored: memory up to 8 MB, then a temporary file."""
    return cast(BinaryIO, tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024))


def _response(
    status: int, code: str, message: str, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    """A request's refusal or failure, as its endpoint answers one (OpenAI's error body)."""
    body = error_body(status, code, message, param)
    return {"status_code": status, "request_id": request_id, "body": body}


def _ended(code: str) -> dict[str, str]:
    why = "cancelled" if code == "batch_cancelled" else "past its completion window"
    return {"code": code, "message": f"the batch was {why} before this request was answered"}
