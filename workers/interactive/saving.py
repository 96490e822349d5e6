"""A save call's weights written: exported by the engine to the executor's own disk (encrypted
to the caller's age recipients for an external export), checked against the tenant's cap on
checkpoint storage with their size known, then uploaded under the checkpoint's prefix.

Where a cap applies, the check, the upload and the checkpoint's row are one transaction under
the tenant's storage lock (`interactive_storage.make_room`), so the cap holds exactly: a save
that would pass it fails saying so, nothing uploaded, and what its name held is kept. Where no
cap applies, nothing is locked and the row is recorded with the call's answer, as before. A
database that goes away meanwhile is waited out (the upload is done again: it overwrites).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from control_plane import age_export
from control_plane.interactive_calls import Call
from control_plane.interactive_saves import Saved, checkpoint_location, record
from control_plane.interactive_storage import StorageFull, make_room
from control_plane.services import Services
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.job_io import through_blips


def save(
    services: Services,
    engine: InteractiveEngine,
    model: str,
    call: Call,
    *,
    base_name: str,
    scratch: Path,
    patience_s: float,
) -> tuple[dict[str, Any], Saved]:
    """The save `call` asks of the engine's `model`: its answer and the checkpoint written."""
    name = str(call.request.get("path") or f"{call.seq:06d}")
    if "/" in name or name in (".", ".."):
        raise InteractiveError(f"a checkpoint name cannot contain '/': {name!r}")
    saved = checkpoint_location(call, name)
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        directory = Path(work) / "weights"
        if saved.kind == "state":
            engine.save_state(model, directory, base_name=base_name)
        else:
            engine.export_adapter(model, directory, base_name=base_name)
        if saved.kind == "external" and (keys := call.request.get("age_encryption_recipients")):
            age_export.encrypt_directory(directory, keys)
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        try:
            saved = through_blips(
                lambda: _store(services, call, saved, directory, size),
                what="save",
                patience_s=patience_s,
            )
        except StorageFull as full:
            raise InteractiveError(str(full)) from None
    result: dict[str, Any] = {"path": saved.path, "type": call.kind}
    if saved.kind == "external":
        result["size_bytes"] = saved.size_bytes
    return result, saved


def _store(services: Services, call: Call, saved: Saved, directory: Path, size: int) -> Saved:
    """The files uploaded under the checkpoint's prefix once the tenant's cap has room for their
    `size` bytes; where a cap applies, its row recorded in the same transaction, under the
    tenant's lock (the call's answer records it again)."""
    default_cap = services.settings.max_checkpoint_bytes_per_tenant
    with services.engine.begin() as conn:
        checkpoint = (call.model_id, saved.kind, saved.name)
        capped = make_room(conn, call.tenant_id, default_cap, checkpoint, size)
        if saved.kind == "external":
            # What the name held goes: an encrypted export's files are named apart.
            services.store.delete_prefix(saved.prefix)
        stored = services.store.put_directory(saved.prefix, directory)
        files = {n: {"size": info.size, "sha256": info.sha256} for n, info in stored.items()}
        saved = replace(saved, size_bytes=sum(info.size for info in stored.values()), files=files)
        if capped:
            record(conn, call, saved)
    return saved
