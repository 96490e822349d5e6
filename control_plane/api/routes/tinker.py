"""/api/v1: the HTTP API of Thinking Machines' Tinker, for its official `tinker` SDK (0.38).

Point the SDK at loraforge with `tinker.ServiceClient(base_url=<loraforge>, api_key="tml-" +
<a loraforge key>)`: the SDK sends the key as `X-API-Key` and insists on that prefix, which
`deps.get_principal` takes off. Any live key of the tenant drives sessions, but a reader's.

- Handshake: `GET healthz`; `POST client/config` answers flags that have the SDK exchange its
  key for JWTs at `auth/token` (`tinker_jwt_auth`; off, it sends the key itself), keep it on
  httpx, uncompressed and one forward chunk at a time; `POST client/dynamic_config`; `GET
  get_server_capabilities` (the ready bases).
- A session: `create_session`, `session_heartbeat`, `sessions/{id}/finish` (unloads its
  models); `telemetry` is accepted and dropped.
- Calls on a model, each answered at once with a future (`{"request_id"}`): `create_model`,
  `forward_backward` (protobuf, or its JSON shape; `forward_only` makes it a `forward`),
  `optim_step`, `save_weights`, `save_weights_for_sampler`, `load_weights`, `asample`,
  `unload_model`. `get_info`, `create_sampling_session` and `samplers/{id}` answer directly.
- The futures (`retrieve_future`, `retrieve_futures`, `cancel_future`) are
  `routes/tinker_futures.py`'s.

A tenant's runs, checkpoints and sessions are `routes/tinker_runs.py`'s; weights exported for
use elsewhere and their downloads `routes/tinker_exports.py`'s; custom losses a session uploads
(`create_custom_loss`, run by `forward_backward` with `loss_fn: custom`)
`routes/tinker_losses.py`'s; the key a request presents (`auth/apikey/me`, for `tinker auth
login`) and the JWT exchange (`auth/token`) `routes/tinker_auth.py`'s; what the sessions used
(`billing/usage/events`) `routes/tinker_usage.py`'s. Anything else under
/api/v1 is a 404 naming the endpoint: the SDK raises it at once, where a
5xx would have it retry for minutes. A model that was unloaded answers 410 (a 409 too is
retried by the SDK). None of this is in the OpenAPI document: it is Tinker's API, not ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Connection

from control_plane import (
    audit,
    custom_losses,
    interactive,
    interactive_runs,
    interactive_sessions,
    interactive_storage,
    session_weights,
)
from control_plane.api import tinker_wire
from control_plane.api.deps import Caller, ConnDep, ServicesDep, Writer
from control_plane.api.errors import ApiError, not_found
from control_plane.api.tinker_answers import PROTOBUF
from control_plane.api.tinker_sample_schemas import Sample
from control_plane.api.tinker_schemas import (
    ClientConfigBody,
    ForwardBackward,
    LoadWeights,
    ModelCreate,
    ModelData,
    ModelInfo,
    ModelRef,
    OptimStep,
    SamplerInfo,
    SamplingSessionCreate,
    SaveWeights,
    ServerCapabilities,
    SessionCreate,
    SessionFinish,
    SessionHeartbeat,
    SupportedModel,
    UntypedFuture,
)
from control_plane.base_catalog import get_base_model
from control_plane.interactive import CallKind
from control_plane.tenants import Principal

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)

_CLIENT_CONFIG = {
    # The SDK exchanges the credential it was given (an API key, else TINKER_CREDENTIAL_CMD's).
    "credential_default_source": "api_key",
    "use_pyqwest_transport": False,
    "proto_compress_fwdbwd": False,
    # One chunk of a forward_backward at a time, so their seq order is the SDK's.
    "parallel_fwdbwd_chunks": False,
    # A sampling client opened from a handle asks for its clone number (`join_sampling_session`).
    "sample_join_sampling_session": True,
}
_DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@contextmanager
def domain_errors() -> Iterator[None]:
    """The domain's refusals as this API's errors."""
    try:
        yield
    except interactive.NotFound as exc:
        raise not_found(exc.kind, exc.ident) from None
    except interactive.ModelUnloaded as exc:
        raise ApiError(410, "model_unloaded", str(exc), "model_id") from None
    except interactive.Refused as exc:
        raise ApiError(400, "invalid_request", str(exc), exc.param) from None
    except interactive_runs.OverLimit as exc:
        raise ApiError(403, "interactive_model_limit", str(exc)) from None
    except interactive_storage.StorageFull as exc:
        raise ApiError(403, "checkpoint_storage_full", str(exc)) from None


# -- the handshake ------------------------------------------------------------------------------


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/client/config")
def client_config(_: ClientConfigBody, caller: Caller, services: ServicesDep) -> dict[str, Any]:
    # One long poll a sampling client for its samples' completions (`retrieve_futures`).
    settings = services.settings
    return {
        **_CLIENT_CONFIG,
        "pjwt_auth_enabled": settings.tinker_jwt_auth,
        "sample_use_retrieve_futures": settings.tinker_session_polling,
        "custom_loss_server_side": settings.tinker_custom_losses_on_server,
    }


@router.post("/client/dynamic_config")
def client_dynamic_config(_: ClientConfigBody, caller: Caller) -> dict[str, Any]:
    return _DYNAMIC_CONFIG


@router.get("/get_server_capabilities")
def get_server_capabilities(conn: ConnDep, services: ServicesDep) -> ServerCapabilities:
    """The bases a model can be created on now: those a live executor holds."""
    bases = interactive.served_bases(conn, services.settings.lease_seconds)
    return ServerCapabilities(supported_models=[SupportedModel(model_name=b.name) for b in bases])


@router.post("/telemetry")
def telemetry(caller: Caller) -> dict[str, str]:
    """The SDK's own diagnostics: loraforge keeps none of them."""
    return {"status": "accepted"}


# -- sessions -----------------------------------------------------------------------------------


@router.post("/create_session")
def create_session(body: SessionCreate, conn: ConnDep, caller: Writer) -> dict[str, Any]:
    session_id = interactive_sessions.create_session(
        conn,
        caller.tenant_id,
        tags=body.tags,
        user_metadata=body.user_metadata or {},
        sdk_version=body.sdk_version,
        display_name=body.display_name,
    )
    conn.commit()
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(body: SessionHeartbeat, conn: ConnDep, caller: Writer) -> dict[str, str]:
    with domain_errors():
        interactive_sessions.heartbeat(conn, caller.tenant_id, body.session_id)
    conn.commit()
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(
    session_id: str, body: SessionFinish, conn: ConnDep, caller: Writer
) -> dict[str, Any]:
    # A finish naming no reason (a client older than the SDK's reasons) closed normally.
    reason = body.reason.type if body.reason is not None else "success"
    with domain_errors():
        unloads = interactive_sessions.finish_session(
            conn, caller.tenant_id, session_id, reason, body.detail
        )
    conn.commit()
    return {"session_id": session_id, "unload_futures": unloads}


# -- models and their calls ---------------------------------------------------------------------


def _future(future_id: str, model_id: str | None = None) -> UntypedFuture:
    return UntypedFuture(request_id=future_id, model_id=model_id)


@router.post("/create_model")
def create_model(
    body: ModelCreate, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    with domain_errors():
        base = interactive.ready_base(conn, body.base_model)
        interactive.require_served(conn, base.id, services.settings.lease_seconds)
        limit = services.settings.max_interactive_models_per_tenant
        interactive_runs.require_room(conn, caller.tenant_id, limit)
        request = body.model_dump(mode="json", include={"base_model", "lora_config"})
        request["user_metadata"] = body.user_metadata
        model, future = interactive.create_model(
            conn,
            caller.tenant_id,
            body.session_id,
            base,
            body.lora_config.model_dump(mode="json"),
            request,
        )
    conn.commit()
    return _future(future, model.id)


@router.post("/get_info")
def get_info(body: ModelRef, conn: ConnDep, caller: Writer) -> ModelInfo:
    with domain_errors():
        model = interactive.get_model(conn, caller.tenant_id, body.model_id)
    base = get_base_model(conn, model.base_model_id)
    assert base is not None, "a model's base is never deleted (foreign key)"
    return ModelInfo(
        model_id=model.id,
        model_data=ModelData(arch=base.architecture, model_name=base.name, tokenizer_id=base.name),
        model_name=base.name,
        lora_rank=model.lora_config.get("rank"),
    )


@router.post("/unload_model")
def unload_model(body: ModelRef, conn: ConnDep, caller: Writer) -> UntypedFuture:
    with domain_errors():
        future = interactive.unload(conn, caller.tenant_id, body.model_id)
    conn.commit()
    return _future(future, body.model_id)


def _enqueue(
    conn: Connection,
    caller: Principal,
    model_id: str,
    kind: CallKind,
    request: dict[str, Any],
    seq_id: int | None,
) -> UntypedFuture:
    with domain_errors():
        future = interactive.enqueue(
            conn, caller.tenant_id, model_id, kind, request, client_seq=seq_id
        )
    conn.commit()
    return _future(future, model_id)


async def forward_backward_body(request: Request) -> ForwardBackward:
    """The body as the SDK sends it (protobuf) or as its JSON shape, validated the same way."""
    raw = await request.body()
    if request.headers.get("content-encoding"):
        raise ApiError(
            400,
            "unsupported_encoding",
            "Send the body uncompressed: this server does not ask for compression.",
        )
    try:
        if request.headers.get("content-type", "").startswith(PROTOBUF):
            fields = tinker_wire.decode_forward_backward(raw)
        else:
            fields = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", f"the body cannot be read: {exc}") from None
    try:
        return ForwardBackward.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


@router.post("/forward_backward")
def forward_backward(
    body: Annotated[ForwardBackward, Depends(forward_backward_body)],
    conn: ConnDep,
    caller: Writer,
) -> UntypedFuture:
    kind = CallKind.FORWARD if body.forward_only else CallKind.FORWARD_BACKWARD
    request = body.model_dump(mode="json", include={"forward_backward_input", "seq_id"})
    loss_id = body.forward_backward_input.custom_loss_id
    if loss_id is not None:
        # The session's uploaded loss goes with the call, for the executor to run.
        with domain_errors():
            loss = custom_losses.for_model(conn, caller.tenant_id, body.model_id, loss_id)
            custom_losses.check_data(loss, request["forward_backward_input"]["data"])
        request["forward_backward_input"]["custom_loss"] = loss.request()
    return _enqueue(conn, caller, body.model_id, kind, request, body.seq_id)


@router.post("/optim_step")
def optim_step(body: OptimStep, conn: ConnDep, caller: Writer) -> UntypedFuture:
    request = body.model_dump(mode="json", include={"adam_params", "seq_id"})
    return _enqueue(conn, caller, body.model_id, CallKind.OPTIM_STEP, request, body.seq_id)


def _save_request(body: SaveWeights) -> dict[str, Any]:
    return body.model_dump(mode="json", include={"path", "seq_id", "ttl_seconds", "user_metadata"})


@router.post("/save_weights")
def save_weights(
    body: SaveWeights, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    cap = services.settings.max_checkpoint_bytes_per_tenant
    with domain_errors():
        interactive_storage.require_room(conn, caller.tenant_id, cap, body.model_id, body.seq_id)
        if body.path is not None and not body.overwrite:
            interactive_runs.check_name_free(conn, caller.tenant_id, body.model_id, body.path)
    request = _save_request(body)
    return _enqueue(conn, caller, body.model_id, CallKind.SAVE_WEIGHTS, request, body.seq_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(
    body: SaveWeights, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    cap = services.settings.max_checkpoint_bytes_per_tenant
    with domain_errors():
        interactive_storage.require_room(conn, caller.tenant_id, cap, body.model_id, body.seq_id)
        future, _ = interactive.save_for_sampler(
            conn, caller.tenant_id, body.model_id, _save_request(body), client_seq=body.seq_id
        )
    conn.commit()
    return _future(future, body.model_id)


@router.post("/load_weights")
def load_weights(
    body: LoadWeights, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    """Weights saved by `save_state` loaded into a model; or, addressed by session and
    `model_seq_id`, a new training run of the session started from them."""
    request = body.model_dump(mode="json", include={"path", "optimizer", "seq_id"})
    with domain_errors():
        session_weights.refuse_optimizer(body.path, bool(body.optimizer))
    if body.model_id is None:
        assert body.session_id is not None and body.model_seq_id is not None  # the schema's
        with domain_errors():
            model, future, started_from = session_weights.create_from_state(
                conn,
                caller.tenant_id,
                body.session_id,
                body.model_seq_id,
                path=body.path,
                base_name=body.base_model,
                user_metadata=body.user_metadata,
                request=request,
                lease_seconds=services.settings.lease_seconds,
                limit=services.settings.max_interactive_models_per_tenant,
                shared=services.settings.tinker_public_checkpoints,
            )
            if started_from is not None:
                audit.checkpoint_read(conn, caller, started_from, "load")
        conn.commit()
        return _future(future, model.id)
    with domain_errors():
        loaded = session_weights.check_loadable(
            conn,
            caller.tenant_id,
            body.model_id,
            body.path,
            shared=services.settings.tinker_public_checkpoints,
        )
        audit.checkpoint_read(conn, caller, loaded, "load")
    request = session_weights.load_request(loaded, request, caller.tenant_id)
    return _enqueue(conn, caller, body.model_id, CallKind.LOAD_WEIGHTS, request, body.seq_id)


# -- sampling -----------------------------------------------------------------------------------


@router.post("/create_sampling_session")
def create_sampling_session(
    body: SamplingSessionCreate, conn: ConnDep, caller: Writer, services: ServicesDep
) -> dict[str, str]:
    with domain_errors():
        sampler, sampled = session_weights.create_sampler(
            conn,
            caller.tenant_id,
            body.session_id,
            base_name=body.base_model,
            model_path=body.model_path,
            lease_seconds=services.settings.lease_seconds,
            shared=services.settings.tinker_public_checkpoints,
        )
        if sampled is not None:
            audit.checkpoint_read(conn, caller, sampled, "sample")
    conn.commit()
    return {"type": "create_sampling_session", "sampling_session_id": sampler.id}


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, conn: ConnDep, caller: Writer) -> SamplerInfo:
    with domain_errors():
        model = interactive.get_model(conn, caller.tenant_id, sampler_id)
    base = get_base_model(conn, model.base_model_id)
    assert base is not None, "a model's base is never deleted (foreign key)"
    return SamplerInfo(sampler_id=model.id, base_model=base.name, model_path=model.model_path)


@router.post("/asample")
def asample(body: Sample, conn: ConnDep, caller: Writer) -> UntypedFuture:
    request = body.model_dump(
        mode="json", exclude={"type", "sampling_session_id"}, exclude_none=True
    )
    future = _enqueue(conn, caller, body.sampling_session_id, CallKind.SAMPLE, request, None)
    # One id per sample, which the SDK stamps on the sequences of the answer.
    future.sample_sequence_ids = [f"{future.request_id}:{i}" for i in range(body.num_samples)]
    return future


@router.api_route("/{endpoint:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def not_offered(endpoint: str) -> None:
    raise ApiError(
        404,
        "tinker_endpoint_not_supported",
        f"loraforge's Tinker-compatible API does not offer /api/v1/{endpoint}: it serves "
        "training and sampling sessions (create_model, forward_backward, create_custom_loss, "
        "optim_step, save_weights, save_weights_for_sampler, load_weights, asample, "
        "retrieve_future) and "
        "their runs, checkpoints and sessions (training_runs, checkpoints, weights_info, "
        "sessions).",
    )
