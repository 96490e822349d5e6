"""Batches (OpenAI's Batch API, `/v1/batches`): a file of chat or text completions that the
interactive executors answer a few at a time, in the tenant's chat session, beside its chats.

A tenant evaluating a fine-tuned adapter on a few thousand prompts uploads them as OpenAI's
batch input (a JSONL file, purpose `batch`: one `{"custom_id", "method": "POST", "url",
"body"}` a line) and creates a batch: no connection held per request, no client-side retry
loop. Its lines are rows of `batch_requests`; the runner's pass (`api.batch_runner`, every
second from the beat) asks up to a window of them at once and collects their answers as their
calls finish, and once none is left writes the answers to an output file and the refusals and
the lines never run to an error file (purpose `batch_output`), as OpenAI's are shaped.

States, as OpenAI names them: `in_progress` (its lines checked when it was created: a file a
line of which would be refused is refused whole, with the line), then `completed` (the step
that writes its files sets `finalizing_at` and ends it in one transaction, so `finalizing` is
never seen); `cancelling` then `cancelled` (the calls no
executor took yet withdrawn, those running awaited); `expired` once past its completion
window (24 h). `failed` is OpenAI's for a file refused after creation, which never happens
here: it is refused at creation instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select, text, update

from control_plane.db.tables import Batch, BatchRequest
from control_plane.ids import new_id
from control_plane.pagination import newest_first
from control_plane.records import _FromRow

batches = cast(Table, Batch.__table__)
batch_requests = cast(Table, BatchRequest.__table__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = {"24h": timedelta(hours=24)}
# OpenAI's own bounds on a batch's requests and its file.
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
# A custom_id's length, as the ids people put there (a dataset's row key) are.
MAX_CUSTOM_ID = 512
# The states the runner's pass still moves.
MOVING = ("in_progress", "cancelling")


class BatchInputError(Exception):
    """A line of a batch's input that cannot run: `line` (1-based) and why."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")


@dataclass(frozen=True)
class InputLine:
    line: int  # 1-based, as an editor shows it
    custom_id: str
    url: str
    body: dict[str, Any]


def read_input(data: bytes) -> list[InputLine]:
    """The requests of a batch input file, each checked for its shape (not its body, which the
    endpoint's schema checks when the batch is created); BatchInputError at the first line that
    is not one."""
    lines: list[InputLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            unstorable = _unstorable(item)
        except RecursionError:
            raise BatchInputError(number, "not a JSON object (nested too deeply)") from None
        except ValueError as exc:  # not UTF-8, not JSON, an integer past Python's digit limit
            raise BatchInputError(number, f"not a JSON object ({exc})") from None
        if not isinstance(item, dict):
            raise BatchInputError(number, "not a JSON object")
        if unstorable is not None:
            raise BatchInputError(number, f"a string holds {unstorable}: remove it")
        unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise BatchInputError(number, f"unknown field(s) {', '.join(unknown)}")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise BatchInputError(
                number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
            )
        if custom_id in seen:
            raise BatchInputError(number, f"custom_id {custom_id!r} is used by an earlier line")
        seen.add(custom_id)
        if item.get("method") != "POST":
            raise BatchInputError(number, "method must be 'POST'")
        if item.get("url") not in ENDPOINTS:
            raise BatchInputError(number, f"url must be one of {', '.join(ENDPOINTS)}")
        if not isinstance(item.get("body"), dict):
            raise BatchInputError(number, "body must be a JSON object (the request's body)")
        lines.append(InputLine(number, custom_id, item["url"], item["body"]))
        if len(lines) > MAX_REQUESTS:
            raise BatchInputError(number, f"a batch holds at most {MAX_REQUESTS} requests")
    if not lines:
        raise BatchInputError(1, "the file holds no request")
    return lines


def _unstorable(value: Any) -> str | None:
    """What no text in PostgreSQL may hold, where a key or string of `value` holds it."""
    if isinstance(value, str):
        if "\x00" in value:
            return "a NUL character (U+0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape half a surrogate pair: no character
            return "a lone surrogate escape (\\ud800-\\udfff), half a character"
        return None
    items: list[Any] = []
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    return next((found for item in items if (found := _unstorable(item)) is not None), None)


@dataclass(frozen=True)
class BatchRecord(_FromRow):
    id: str
    tenant_id: str
    created_by: str
    endpoint: str
    input_file_id: str
    completion_window: str
    model: str
    status: str
    metadata: dict[str, Any] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: datetime
    in_progress_at: datetime | None
    expires_at: datetime
    finalizing_at: datetime | None
    completed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None


class NotCancellable(Exception):
    """The batch is over: nothing is left to cancel."""


def create(
    conn: Connection,
    *,
    tenant_id: str,
    created_by: str,
    endpoint: str,
    input_file_id: str,
    window: str,
    model: str,
    metadata: dict[str, str] | None,
    lines: list[InputLine],
) -> BatchRecord:
    """A batch of `lines`, in progress at once (not committed)."""
    batch_id = new_id("batch")
    row = conn.execute(
        insert(batches)
        .values(
            id=batch_id,
            tenant_id=tenant_id,
            created_by=created_by,
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=window,
            model=model,
            status="in_progress",
            metadata=metadata,
            total=len(lines),
            in_progress_at=text("now()"),
            expires_at=text("now() + :window").bindparams(window=WINDOWS[window]),
        )
        .returning(*batches.c)
    ).one()
    conn.execute(
        insert(batch_requests),
        [
            {"batch_id": batch_id, "line": one.line, "custom_id": one.custom_id, "body": one.body}
            for one in lines
        ],
    )
    return BatchRecord.from_row(row)


def has_asked(conn: Connection, batch_id: str) -> bool:
    """Whether calls were asked for the batch and not yet collected."""
    return bool(
        conn.execute(
            select(batch_requests.c.line)
            .where(batch_requests.c.batch_id == batch_id, batch_requests.c.status == "asked")
            .limit(1)
        ).first()
    )


def get(conn: Connection, tenant_id: str, batch_id: str) -> BatchRecord | None:
    row = conn.execute(
        select(batches).where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id)
    ).one_or_none()
    return BatchRecord.from_row(row) if row is not None else None


def list_batches(
    conn: Connection, tenant_id: str, *, after: str | None, limit: int
) -> tuple[list[BatchRecord], bool]:
    """Newest first; `after` the id of the previous page's last batch (LookupError if none)."""
    rows, more = newest_first(
        conn, batches, scope=batches.c.tenant_id == tenant_id, after=after, limit=limit
    )
    return [BatchRecord.from_row(r) for r in rows], more


def request_cancel(conn: Connection, tenant_id: str, batch_id: str) -> BatchRecord | None:
    """The batch `cancelling` (the runner's next pass withdraws what no executor took, awaits
    what runs, then leaves it `cancelled`); as it is if it is cancelling or cancelled already;
    None if there is no such batch, NotCancellable if it is over otherwise (not committed)."""
    row = conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id)
        .where(batches.c.status == "in_progress")
        .values(status="cancelling", cancelling_at=text("now()"))
        .returning(*batches.c)
    ).one_or_none()
    if row is not None:
        return BatchRecord.from_row(row)
    found = get(conn, tenant_id, batch_id)
    if found is not None and found.status not in ("cancelling", "cancelled"):
        raise NotCancellable(f"batch {batch_id} is {found.status}: there is nothing to cancel")
    return found
