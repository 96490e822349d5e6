"""What an interactive save call writes, where, and its row.

Three saves write weights under a name: `save_weights` a resumable `state` (the adapter in fp32
and the optimizer beside it), `save_weights_for_sampler` an adapter to `sample` from, and
`save_weights_external` the adapter for use outside the platform (a PEFT directory, the format
serving engines load: `adapter_config.json` and `adapter_model.safetensors` in bf16), which its
owner downloads through signed URLs (`GET .../external_weights_urls`; the official CLI's
`tinker checkpoint download`), each file encrypted to the save's age recipients when it named
any. Each is named to the SDK by a tinker:// path whose segment says which
(`tinker://<model>/<weights|sampler_weights|external_weights>/<name>`), and stored under an
object-store prefix of its own. A checkpoint's row records every file it wrote, with its size and
sha256 (`files`), so a download is checked against what the executor wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import bindparam

from control_plane.ids import new_id

if TYPE_CHECKING:
    from control_plane.interactive_calls import Call

# A save call's kind: what it writes (the checkpoint's kind) and the segment that names it in
# its tinker:// path and object-store prefix.
SAVES = {
    "save_weights": ("state", "weights"),
    "save_weights_for_sampler": ("sampler", "sampler_weights"),
    "save_weights_external": ("external", "external_weights"),
}
# A checkpoint's kind, its path's segment and the SDK's name for its type.
SEGMENTS = {"state": "weights", "sampler": "sampler_weights", "external": "external_weights"}
CheckpointType = Literal["training", "sampler", "external"]
SDK_TYPES: dict[str, CheckpointType] = {
    "state": "training",
    "sampler": "sampler",
    "external": "external",
}
# The suffix of a file encrypted to its save's age recipients.
ENCRYPTED_SUFFIX = ".age"


def encrypted(files: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's files (its row's `files`) are encrypted to age recipients: the
    platform cannot read them back."""
    return any(name.endswith(ENCRYPTED_SUFFIX) for name in files or {})


def checkpoint_path(model_id: str, save_kind: str, name: str) -> str:
    """The tinker:// path the SDK is given for what a save call of `save_kind` writes."""
    return f"tinker://{model_id}/{SAVES[save_kind][1]}/{name}"


@dataclass(frozen=True)
class Saved:
    """Weights a save call writes: `kind` (`state`, `sampler` or `external`), its `name`, its
    tinker:// `path`, the object-store `prefix` it is under, the bytes written and each file's
    size and sha256 (once they are), the seconds it is kept (the save's `ttl_seconds`; None:
    until deleted) and what the SDK attached to it."""

    kind: str
    name: str
    path: str
    prefix: str
    size_bytes: int | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] | None = None


def checkpoint_location(call: Call, name: str) -> Saved:
    """Where a save call's weights go under `name` (their size is known once written)."""
    kind, segment = SAVES[call.kind]
    path = checkpoint_path(call.model_id, call.kind, name)
    prefix = (
        f"tenants/{call.tenant_id}/sessions/{call.session_id}/models/{call.model_id}/"
        f"{segment}/{name}/"
    )
    ttl = call.request.get("ttl_seconds")
    return Saved(
        kind,
        name,
        path,
        prefix,
        ttl_seconds=None if ttl is None else int(ttl),
        user_metadata=call.request.get("user_metadata"),
    )


_RECORD = text(
    "INSERT INTO interactive_checkpoints "
    "(id, model_id, tenant_id, kind, name, path, storage_prefix, size_bytes, files, "
    "expires_at, user_metadata, from_version_id) VALUES (:id, :model, :tenant, :kind, :name, "
    ":path, :prefix, :size, :files, "
    "now() + make_interval(secs => CAST(:ttl AS double precision)), :metadata, "
    "(SELECT weights_version_id FROM interactive_models WHERE id = CAST(:model AS varchar))) "
    "ON CONFLICT (model_id, kind, name) DO UPDATE "
    "SET storage_prefix = excluded.storage_prefix, size_bytes = excluded.size_bytes, "
    "files = excluded.files, expires_at = excluded.expires_at, "
    "user_metadata = excluded.user_metadata, created_at = now(), public = false, "
    "from_version_id = excluded.from_version_id"
).bindparams(bindparam("metadata", type_=JSONB), bindparam("files", type_=JSONB))


def record(conn: Connection, call: Call, saved: Saved) -> None:
    """The checkpoint's row (not committed); a save under a name taken overwrites it, and what
    was published of it is its tenant's own again (the weights are new). It keeps the adapter
    version its model last loaded, if any: what a version published from it descends from."""
    conn.execute(
        _RECORD,
        {
            "id": new_id("interactive_checkpoint"),
            "model": call.model_id,
            "tenant": call.tenant_id,
            "kind": saved.kind,
            "name": saved.name,
            "path": saved.path,
            "prefix": saved.prefix,
            "size": saved.size_bytes,
            "files": saved.files,
            "ttl": saved.ttl_seconds,
            "metadata": saved.user_metadata or {},
        },
    )
