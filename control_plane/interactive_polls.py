"""A sampling session's completions, as the SDK's one poller a sampling client reads them
(`retrieve_futures`), instead of one poll a sample.

A sampling client numbers its requests in a block of 10^9 of its own (its clone of the session:
`seq_id // 10^9`, 0 for the client that created it), and asks for the completions of those
requests after a cursor. A sampler's calls run in their order (a call still running holds back
every later one), so they finish in it too, save a call failed while waiting (a cancel, or
weights that are gone), and a call is seen only after every call numbered before it (each takes
its number under its model's row lock and commits before the next can): the cursor carries the longest run of the clone's calls from its first
that are all finished, and how many finished past that run, so a poll reports what finished
since the last without keeping any state of its own. A call finished out of order is reported
again until the run reaches it (the SDK keeps one completion a request), never lost. Calls of
other clones of the sampler are never reported to this one; a client opened from another's
handle is given its clone number by `join`, each once, so no two clones share a block.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from control_plane.interactive import ModelKind, Refused, get_model
from control_plane.interactive_calls import FORGET

CLONE_BLOCK = 1_000_000_000
# The cursor: (the last seq of the finished run + 1) << COUNT_BITS | the count finished past it.
COUNT_BITS = 20
_COUNT_MAX = (1 << COUNT_BITS) - 1

_CALLS = text(
    "SELECT id, seq, status IN ('completed', 'failed') AS finished, status = 'failed' AS failed "
    "FROM interactive_calls WHERE model_id = :model AND seq > :after "
    "AND coalesce(client_seq, 0) >= :low AND coalesce(client_seq, 0) < :high ORDER BY seq"
)


@dataclass(frozen=True)
class Completion:
    request_id: str
    failed: bool


@dataclass(frozen=True)
class Completions:
    """What finished since the cursor asked after (`new`: anything), the cursor to ask after
    next, and whether any of the clone's calls is still unfinished."""

    completions: list[Completion]
    cursor: int
    new: bool
    waiting: bool


def _cursor(after: int, past: int) -> int:
    return (after + 1) << COUNT_BITS | min(past, _COUNT_MAX)


def read(conn: Connection, tenant_id: str, sampler_id: str, clone: int, cursor: int) -> Completions:
    """The completions of the clone's calls on the tenant's model `sampler_id` after `cursor`
    (0: from the first); NotFound for another tenant's or no model."""
    get_model(conn, tenant_id, sampler_id)
    after = (cursor >> COUNT_BITS) - 1
    seen_past = cursor & _COUNT_MAX
    rows = conn.execute(
        _CALLS,
        {
            "model": sampler_id,
            "after": after,
            "low": clone * CLONE_BLOCK,
            "high": (clone + 1) * CLONE_BLOCK,
        },
    ).all()
    finished = [row for row in rows if row.finished]
    open_seqs = [row.seq for row in rows if not row.finished]
    run_end = open_seqs[0] - 1 if open_seqs else (rows[-1].seq if rows else after)
    past = sum(1 for row in finished if row.seq > run_end)
    # Calls never finish twice: more finished past `after` than the cursor saw is news.
    new = len(finished) > seen_past
    return Completions(
        completions=[Completion(row.id, bool(row.failed)) for row in finished] if new else [],
        cursor=_cursor(run_end, past) if new else cursor,
        new=new,
        waiting=bool(open_seqs),
    )


def forget(conn: Connection, tenant_id: str, sampler_id: str, request_ids: list[str]) -> int:
    """Let go of the payloads of finished calls whose answers the SDK has fetched (not
    committed); how many."""
    if not request_ids:
        return 0
    return conn.execute(
        text(
            f"UPDATE interactive_calls SET {FORGET} WHERE id = ANY(:ids) AND model_id = :model "
            "AND tenant_id = :tenant AND finished_at IS NOT NULL AND payload_dropped_at IS NULL"
        ),
        {"ids": request_ids, "model": sampler_id, "tenant": tenant_id},
    ).rowcount


def join(conn: Connection, tenant_id: str, sampler_id: str) -> int:
    """A clone number of the tenant's sampler for a client that joins it (not committed): each
    once, from 1 (the client that created it is 0); NotFound for another tenant's or no model."""
    if get_model(conn, tenant_id, sampler_id).kind != ModelKind.SAMPLER:
        raise Refused(f"{sampler_id} is a training model, not a sampling session", "model_id")
    clone = conn.execute(
        text(
            "UPDATE interactive_models SET next_clone = next_clone + 1 "
            "WHERE id = :id AND next_clone < :blocks RETURNING next_clone - 1"
        ),
        {"id": sampler_id, "blocks": CLONE_BLOCK},
    ).scalar_one_or_none()
    if clone is None:
        raise Refused(f"{sampler_id} has given out every clone number: create another", "model_id")
    return int(clone)
