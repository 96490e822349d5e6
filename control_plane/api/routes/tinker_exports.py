"""/api/v1, a model's weights taken out of the platform, as the `tinker` SDK and its CLI do it.

- `POST save_weights_external` (a writer's key): the model's adapter saved for use elsewhere, a
  PEFT directory (`adapter_config.json`, `adapter_model.safetensors` in bf16) under a name, as
  `tinker://<run>/external_weights/<name>`; each file encrypted to the save's age recipients
  when it names any (`control_plane.age_export`). It counts against the tenant's checkpoint
  storage cap as every save does, and is listed, expires and is deleted like the others.
- `GET training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls` (any
  live key of the tenant): one download URL a file, good for an hour, and when they expire. On
  S3 they are the store's presigned URLs; otherwise they are this API's
  `GET checkpoint_files/{token}`, whose token (itsdangerous, signed with the platform's secret,
  timestamped) names the tenant, the checkpoint and the file: fetched without a key, as the
  SDK's CLI fetches them, and never completing with bytes that do not hash to the sha256 the
  executor recorded (`control_plane.api.downloads`).

`tinker checkpoint download <path>` runs on these: a training checkpoint is loaded into a new
run, exported under `download` with a time to live, downloaded through its URLs and deleted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request, Response

from control_plane import audit, interactive, interactive_runs, interactive_storage
from control_plane.api import signed_urls
from control_plane.api.deps import Caller, ConnDep, DbSlot, ServicesDep, Writer
from control_plane.api.downloads import verified_download
from control_plane.api.errors import ApiError
from control_plane.api.routes.tinker import _enqueue, domain_errors
from control_plane.api.routes.tinker_runs import checkpoint_path
from control_plane.api.tinker_schemas import (
    ExternalWeightsUrls,
    SaveWeightsExternal,
    UntypedFuture,
)
from control_plane.interactive import CallKind
from control_plane.services import Services
from control_plane.storage import ObjectNotFoundError

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)

# How long a checkpoint's download URLs are good for (the SDK's CLI signs again near the end).
URL_SECONDS = signed_urls.URL_SECONDS
_SALT = "loraforge.checkpoint-file"


@router.post("/save_weights_external")
def save_weights_external(
    body: SaveWeightsExternal, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    cap = services.settings.max_checkpoint_bytes_per_tenant
    request = body.model_dump(
        mode="json", include={"path", "seq_id", "ttl_seconds", "age_encryption_recipients"}
    )
    with domain_errors():
        interactive_storage.require_room(conn, caller.tenant_id, cap, body.model_id, body.seq_id)
    kind = CallKind.SAVE_WEIGHTS_EXTERNAL
    return _enqueue(conn, caller, body.model_id, kind, request, body.seq_id)


@router.get("/training_runs/{run_id}/checkpoints/{segment}/{name}/external_weights_urls")
def external_weights_urls(
    run_id: str,
    segment: str,
    name: str,
    request: Request,
    conn: ConnDep,
    caller: Caller,
    services: ServicesDep,
) -> ExternalWeightsUrls:
    """A download URL for each file of an external weights checkpoint, and when they expire."""
    path = checkpoint_path(run_id, segment, name)
    with domain_errors():
        saved = interactive_runs.find_checkpoint(
            conn, caller.tenant_id, path, shared=services.settings.tinker_public_checkpoints
        )
    if saved.kind != "external":
        raise ApiError(
            400,
            "invalid_request",
            f"{path} is not external weights: only a save_weights_external checkpoint has "
            "download URLs; export this one with save_weights_external (the CLI's `tinker "
            "checkpoint download` does it for a save_state path)",
            "checkpoint_id",
        )
    expires = datetime.now(UTC) + timedelta(seconds=URL_SECONDS)
    api = signed_urls.api_base(request, services)
    urls = {}
    for file_name in sorted(saved.files or {}):
        presigned = services.store.presigned_url(saved.storage_prefix + file_name, URL_SECONDS)
        if presigned is None:
            token = signed_urls.sign(services, _SALT, caller.tenant_id, path, file_name)
            presigned = f"{api}/api/v1/checkpoint_files/{token}"
        urls[file_name] = presigned
    audit.checkpoint_read(conn, caller, saved, "download")
    conn.commit()
    return ExternalWeightsUrls(urls=urls, expires=expires)


@router.get("/checkpoint_files/{token}", response_class=Response)
def checkpoint_file(token: str, services: ServicesDep, __: DbSlot) -> Response:
    """A file of an external weights checkpoint, by a URL `external_weights_urls` signed: no key
    (the token is the caller's proof), so the connection is the route's own, not a caller's."""
    again = "ask for the checkpoint's URLs again (get_external_weights_urls)"
    tenant_id, path, file_name = signed_urls.read(
        services, _SALT, token, count=3, what="download URL", again=again
    )
    return _download(services, tenant_id, path, file_name)


def _download(services: Services, tenant_id: str, path: str, file_name: str) -> Response:
    gone = ApiError(
        404,
        "checkpoint_not_found",
        f"{path} has no file {file_name!r}: it was deleted or saved again",
    )
    try:
        with services.engine.connect() as conn:
            saved = interactive_runs.find_checkpoint(
                conn, tenant_id, path, shared=services.settings.tinker_public_checkpoints
            )
    except interactive.NotFound:
        raise gone from None
    stored = (saved.files or {}).get(file_name)
    if stored is None:
        raise gone
    try:
        return verified_download(
            services.store,
            saved.storage_prefix + file_name,
            sha256=stored["sha256"],
            size=int(stored["size"]),
            filename=file_name,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{file_name.split("/")[-1]}"'},
        )
    except ObjectNotFoundError:
        raise gone from None
