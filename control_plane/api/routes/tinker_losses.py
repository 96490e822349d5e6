"""/api/v1/create_custom_loss: a session uploads a loss the `tinker` SDK traced
(`ServiceClient.create_custom_loss`), for its `forward_backward` calls to run on the executor
(`loss_fn: custom`, `loss_fn_config: {"loss_id": ...}`; `control_plane.custom_losses`).

The answer is a future, as the SDK expects; its id is the loss's, and `retrieve_future` answers
it at once with `{"type": "create_custom_loss", "loss_id"}`: the graph was checked here, and
nothing waits on an executor. A graph the server does not run is a 400 saying which node and why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import Field

from control_plane import custom_losses
from control_plane.api.deps import ConnDep, ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.routes.tinker import domain_errors
from control_plane.api.tinker_schemas import Id, UntypedFuture, _Body

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)


class CustomLossCreate(_Body):
    """The SDK's `CreateCustomLossRequest`; `control_plane.loss_graphs` reads `inputs` and
    `graph` (the traced loss's nodes, as data)."""

    type: Literal["create_custom_loss"] = "create_custom_loss"
    session_id: Id
    custom_loss_seq_id: Annotated[int, Field(ge=0, lt=2**31)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    inputs: list[Any]
    graph: dict[str, Any]


@router.post("/create_custom_loss")
def create_custom_loss(
    body: CustomLossCreate, conn: ConnDep, caller: Writer, services: ServicesDep
) -> UntypedFuture:
    if not services.settings.tinker_custom_losses_on_server:
        raise ApiError(
            400,
            "custom_losses_run_on_the_client",
            "This server runs no custom losses (LORAFORGE_TINKER_CUSTOM_LOSSES_ON_SERVER is off, "
            "and client/config says so): the SDK runs them itself with forward_backward_custom.",
        )
    with domain_errors():
        loss_id = custom_losses.create(
            conn,
            caller.tenant_id,
            body.session_id,
            body.custom_loss_seq_id,
            body.name,
            body.inputs,
            body.graph,
        )
    conn.commit()
    return UntypedFuture(request_id=loss_id)
