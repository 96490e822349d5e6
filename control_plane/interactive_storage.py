"""What a tenant's interactive checkpoints hold in the object store, and the cap on it.

Each save (`save_state`, `save_weights_for_sampler`) writes a checkpoint whose row records the
bytes it wrote (`size_bytes`; null for rows saved before revision 0024, counted as 0). A tenant
may be held to a cap on their sum: its own `tenants.max_checkpoint_bytes`, else the platform's
`LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT` (none: no cap). The cap holds exactly, in two checks:

- A save asked while the sum is at or over the cap is refused at once (403), nothing asked,
  until checkpoints are deleted or expire (`require_room`).
- A save asked below the cap is checked again when the executor has written its files to its
  own disk and knows their size, before it uploads any (`make_room`): the tenant's storage is
  locked (an advisory lock for the transaction), and a save that would bring the sum past the
  cap (with its bytes in place of what its name held, when it overwrites) fails saying so,
  nothing uploaded; one that fits uploads its files and records its row in that transaction,
  so two saves of one tenant on two executors never both pass on the same sum. Saves of a
  tenant with no cap take no lock.

Checkpoints past their time to live count until the periodic pass deletes them
(`interactive_runs.expire_checkpoints`, every 5 minutes): their files are still stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from control_plane.records import _FromRow
from control_plane.sizes import human_size


class StorageFull(Exception):
    """The tenant's checkpoints hold as many bytes as its cap allows."""


@dataclass(frozen=True)
class CheckpointStorage(_FromRow):
    """A tenant's checkpoints now: how many, the bytes they hold, its name and its own cap
    (None: the platform's)."""

    tenant_name: str
    checkpoints: int
    size_bytes: int
    own_cap: int | None

    def cap(self, default_cap: int | None) -> int | None:
        """The cap that applies: the tenant's own, else the platform's (None: no cap)."""
        return default_cap if self.own_cap is None else self.own_cap


_STORAGE = text(
    """
    SELECT t.name AS tenant_name, t.max_checkpoint_bytes AS own_cap, s.checkpoints, s.size_bytes
    FROM tenants t CROSS JOIN LATERAL (
        SELECT count(*) AS checkpoints,
               CAST(coalesce(sum(c.size_bytes), 0) AS bigint) AS size_bytes
        FROM interactive_checkpoints c WHERE c.tenant_id = t.id
    ) s
    WHERE t.id = :tenant
    """
)


def storage(conn: Connection, tenant_id: str) -> CheckpointStorage:
    """The tenant's checkpoints as they are stored now (those expired and not yet deleted
    included), with its name and its own cap, in one statement.

    Every save asks for this sum (an RL loop saves a sampler an iteration), so it reads
    `ix_interactive_checkpoints_tenant_size` (revision 0028: `tenant_id` with `size_bytes`
    included): an index-only scan of the tenant's own entries, never the table's rows nor other
    tenants' checkpoints (`test_a_tenants_checkpoint_bytes_are_summed_off_its_own_index`)."""
    return CheckpointStorage.from_row(conn.execute(_STORAGE, {"tenant": tenant_id}).one())


def _said(size: int) -> str:
    return f"{size:,} bytes" if size < 1000 else f"{human_size(size)} ({size:,} bytes)"


def require_room(
    conn: Connection, tenant_id: str, default_cap: int | None, model_id: str, client_seq: int | None
) -> None:
    """Refuse a save of `model_id` to a tenant whose checkpoints hold as many bytes as its cap
    or more: its own `max_checkpoint_bytes`, else `default_cap` (the platform's
    `LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT`; None: no cap). A save sent again (its answer
    lost: a `client_seq` its model has taken, as `interactive.enqueue` reads it) is the save
    already asked and answers its future, so it is never refused."""
    if client_seq is not None:
        next_seq = conn.execute(
            text("SELECT next_seq FROM interactive_models WHERE id = :model AND tenant_id = :t"),
            {"model": model_id, "t": tenant_id},
        ).scalar_one_or_none()
        if next_seq is not None and client_seq < next_seq:
            return
    used = storage(conn, tenant_id)
    cap = used.cap(default_cap)
    if cap is None or used.size_bytes < cap:
        return
    count = f"{used.checkpoints} checkpoint{'' if used.checkpoints == 1 else 's'}"
    raise StorageFull(
        f"your tenant holds {_said(used.size_bytes)} in {count}, at or over "
        f"{_which(cap, used.own_cap)}: {_WHAT_TO_DO}"
    )


_WHAT_TO_DO = (
    "delete checkpoints (delete_checkpoint_from_tinker_path) or give them a time to live "
    "(set_checkpoint_ttl_from_tinker_path) before saving again"
)


def _which(cap: int, own_cap: int | None) -> str:
    if own_cap is None:
        return f"the platform's limit (LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT = {_said(cap)})"
    return f"the limit the platform's operator set for it (max_checkpoint_bytes = {_said(cap)})"


_REPLACED = text(
    "SELECT coalesce(size_bytes, 0) FROM interactive_checkpoints "
    "WHERE model_id = :model AND kind = :kind AND name = :name"
)


def make_room(
    conn: Connection,
    tenant_id: str,
    default_cap: int | None,
    checkpoint: tuple[str, str, str],
    size: int,
) -> bool:
    """Room for a save about to write `size` bytes as `checkpoint` (its model, kind and name),
    in the caller's transaction, before anything is uploaded. False where the tenant has no cap
    (nothing locked). Otherwise the tenant's checkpoint storage is locked until the transaction
    ends, and True where the tenant's checkpoints, this save's bytes in place of what the name
    held, stay within the cap: the caller uploads and records the checkpoint's row in this
    transaction. Past the cap, `StorageFull` says by how much and what to do."""
    own_cap = conn.execute(
        text("SELECT max_checkpoint_bytes FROM tenants WHERE id = :t"), {"t": tenant_id}
    ).scalar_one_or_none()
    cap = default_cap if own_cap is None else own_cap
    if cap is None:
        return False
    conn.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('interactive_checkpoints:' || :t))"),
        {"t": tenant_id},
    )
    used = storage(conn, tenant_id)
    model_id, kind, name = checkpoint
    replaced = conn.execute(_REPLACED, {"model": model_id, "kind": kind, "name": name}).scalar()
    after = used.size_bytes - int(replaced or 0) + size
    if after <= cap:
        return True
    raise StorageFull(
        f"this save's files hold {_said(size)}, which would bring your tenant's checkpoints to "
        f"{_said(after)}, past {_which(cap, used.own_cap)}; nothing was written: {_WHAT_TO_DO}"
    )
