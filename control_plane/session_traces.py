"""A session's timeline as a Perfetto trace (`.pftrace`), as the Tinker SDK's
`RestClient.export_session_trace` and `tinker session export-trace` fetch it: open it in
ui.perfetto.dev to see where a training loop's time went.

The trace is built from the session's calls as the database keeps them (their payloads may be
let go; their times stay), with Perfetto's own trace builder (`perfetto.trace_builder`):

- one track for the session, and under it one for each of its models (a training run or a
  sampler), named by kind and id; each call a slice on its model's track from the moment an
  executor took it to its answer, named by its kind, with its `seq`, status, executor and, for a
  failed call, the error as arguments (a model's calls run one at a time, so its slices never
  overlap);
- under each model a counter of its calls waiting (asked and not yet taken by an executor),
  which shows a loop that waits on the platform rather than on its own work.

Timestamps are the database's (nanoseconds since the epoch). Nothing is stored: each download
builds the trace again, so it is always up to date. A session of more than `MAX_CALLS` calls is
traced by its newest `MAX_CALLS` (its track's name says so): 200,000 calls build in about 5 s
into about 30 MB, held in memory while the download is answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent
from perfetto.trace_builder.proto_builder import TraceProtoBuilder
from sqlalchemy import Connection, text

from control_plane.interactive import NotFound

_SEQUENCE = 1
_SESSION_TRACK = 1
MAX_CALLS = 200_000


@dataclass(frozen=True)
class CallTimes:
    model_id: str
    model_kind: str
    seq: int
    kind: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    claimed_by: str | None
    error: dict[str, Any] | None


def check_session(conn: Connection, tenant_id: str, session_id: str) -> None:
    """NotFound unless the session is the tenant's."""
    found = conn.execute(
        text("SELECT 1 FROM interactive_sessions WHERE id = :id AND tenant_id = :tenant"),
        {"id": session_id, "tenant": tenant_id},
    ).scalar_one_or_none()
    if found is None:
        raise NotFound("session", session_id)


@dataclass(frozen=True)
class SessionCalls:
    calls: list[CallTimes]
    total: int  # the session's calls, when more than `MAX_CALLS` were left out


def session_calls(
    conn: Connection, tenant_id: str, session_id: str, *, most: int = MAX_CALLS
) -> SessionCalls:
    """The session's newest `most` calls, each model's in order (NotFound for a session not the
    tenant's)."""
    check_session(conn, tenant_id, session_id)
    rows = conn.execute(
        text(
            "SELECT * FROM (SELECT c.model_id, m.kind AS model_kind, c.seq, c.kind, c.status, "
            "c.created_at, c.started_at, c.finished_at, c.claimed_by, c.error, "
            "m.created_at AS model_created_at, count(*) OVER () AS total "
            "FROM interactive_models m JOIN interactive_calls c ON c.model_id = m.id "
            "WHERE m.session_id = :id ORDER BY c.created_at DESC, c.id DESC LIMIT :most) newest "
            "ORDER BY model_created_at, model_id, seq"
        ),
        {"id": session_id, "most": most},
    ).all()
    fields = CallTimes.__dataclass_fields__
    calls = [CallTimes(**{k: v for k, v in row._mapping.items() if k in fields}) for row in rows]
    return SessionCalls(calls, int(rows[0].total) if rows else 0)


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000) * 1000


def build(session_id: str, found: SessionCalls) -> bytes:
    """The session's calls as a Perfetto trace."""
    builder = TraceProtoBuilder()
    session = builder.add_packet().track_descriptor
    session.uuid = _SESSION_TRACK
    session.name = f"session {session_id}"
    if found.total > len(found.calls):
        session.name += f" (its newest {len(found.calls):,} calls of {found.total:,})"
    tracks: dict[str, tuple[int, int]] = {}
    waiting: list[tuple[int, int, int]] = []  # (time, counter track, +1 or -1)
    for call in found.calls:
        if call.model_id not in tracks:
            tracks[call.model_id] = _model_tracks(builder, call, 2 * len(tracks) + 2)
        track, counter = tracks[call.model_id]
        taken = call.started_at or call.finished_at
        waiting.append((_ns(call.created_at), counter, 1))
        if taken is not None:
            waiting.append((_ns(taken), counter, -1))
        if call.started_at is not None and call.finished_at is not None:
            _slice(builder, track, call)
    levels: dict[int, int] = {}
    for when, counter, step in sorted(waiting):
        levels[counter] = levels.get(counter, 0) + step
        packet = builder.add_packet()
        packet.timestamp = when
        packet.trusted_packet_sequence_id = _SEQUENCE
        packet.track_event.type = TrackEvent.TYPE_COUNTER
        packet.track_event.track_uuid = counter
        packet.track_event.counter_value = levels[counter]
    return builder.serialize()


def _model_tracks(builder: TraceProtoBuilder, call: CallTimes, uuid: int) -> tuple[int, int]:
    """A model's track and its counter of calls waiting, under the session's track."""
    model = builder.add_packet().track_descriptor
    model.uuid = uuid
    model.parent_uuid = _SESSION_TRACK
    kind = "training run" if call.model_kind == "training" else "sampler"
    model.name = f"{kind} {call.model_id}"
    counter = builder.add_packet().track_descriptor
    counter.uuid = uuid + 1
    counter.parent_uuid = uuid
    counter.name = f"{call.model_id} calls waiting"
    counter.counter.SetInParent()
    return uuid, uuid + 1


def _slice(builder: TraceProtoBuilder, track: int, call: CallTimes) -> None:
    assert call.started_at is not None and call.finished_at is not None
    begin = builder.add_packet()
    begin.timestamp = _ns(call.started_at)
    begin.trusted_packet_sequence_id = _SEQUENCE
    event = begin.track_event
    event.type = TrackEvent.TYPE_SLICE_BEGIN
    event.track_uuid = track
    event.name = call.kind
    arguments: list[tuple[str, str | int]] = [("seq", call.seq), ("status", call.status)]
    if call.claimed_by:
        arguments.append(("executor", call.claimed_by))
    if call.error:
        arguments.append(("error", str(call.error.get("error", call.error))))
    for name, value in arguments:
        annotation = event.debug_annotations.add()
        annotation.name = name
        if isinstance(value, int):
            annotation.int_value = value
        else:
            annotation.string_value = value
    end = builder.add_packet()
    end.timestamp = max(_ns(call.finished_at), begin.timestamp)
    end.trusted_packet_sequence_id = _SEQUENCE
    end.track_event.type = TrackEvent.TYPE_SLICE_END
    end.track_event.track_uuid = track
