"""Custom losses a session uploads (`create_custom_loss`), run by the executor in the session's
`forward_backward` calls that name them.

The `tinker` SDK traces a loss function with torch.fx and sends the graph as data; it runs on
the server once `client/config` says `custom_loss_server_side`. A `forward_backward` naming it
then takes one pass on the executor (forward, the loss per datum, backward), where the SDK
would otherwise ask a forward, download the logprobs, compute the loss and its gradient itself
and send that back as a second call. The graph is checked here when it is uploaded
(`loss_graphs.check_loss`: only the operations the server allows) and again where it runs.

A loss belongs to its session: only that session's models may use it, as the SDK says of its
handle. Its id is also its creation's future (`retrieve_future` answers it at once: nothing
waits on an executor). Every function takes the caller's tenant and finds only its rows; none
commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select
from sqlalchemy.dialects.postgresql import insert

from control_plane.db.tables import InteractiveCustomLoss, InteractiveModel
from control_plane.ids import PREFIXES, new_id
from control_plane.interactive import NotFound, Refused, _session
from control_plane.loss_graphs import CheckedLoss, LossGraphError, check_loss

losses = cast(Table, InteractiveCustomLoss.__table__)
models = cast(Table, InteractiveModel.__table__)

# The most losses one session may upload: the SDK uploads each traced loss once a session, so
# a session that reaches this is uploading a new graph each step (a loss built in a loop).
MAX_LOSSES_PER_SESSION = 1000


@dataclass(frozen=True)
class StoredLoss:
    id: str
    session_id: str
    name: str
    inputs: list[dict[str, Any]]  # [{"name", "rank"}], logprobs first
    graph: dict[str, Any]

    def request(self) -> dict[str, Any]:
        """What the executor needs to run it, carried in the call's request."""
        return {"id": self.id, "name": self.name, "inputs": self.inputs, "graph": self.graph}


def is_loss_future(future_id: str) -> bool:
    return future_id.startswith(PREFIXES["interactive_custom_loss"] + "-")


def create(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    seq: int,
    name: str,
    inputs: list[dict[str, Any]],
    graph: dict[str, Any],
) -> str:
    """The loss's id, a new row unless the session's `seq` made this same loss before (a request
    sent again). Refused: a graph the server does not run, a `seq` that made another loss, a
    session at MAX_LOSSES_PER_SESSION."""
    try:
        checked = check_loss(name, inputs, graph)
    except LossGraphError as exc:
        raise Refused(str(exc), "graph") from None
    _session(conn, tenant_id, session_id)
    values = _values(checked)
    loss_id = new_id("interactive_custom_loss")
    made = conn.execute(
        insert(losses)
        .values(id=loss_id, session_id=session_id, tenant_id=tenant_id, seq=seq, **values)
        .on_conflict_do_nothing(constraint="uq_interactive_custom_losses_seq")
        .returning(losses.c.id)
    ).scalar_one_or_none()
    if made is None:
        return _replayed(conn, session_id, seq, values)
    count = conn.execute(select(func.count()).where(losses.c.session_id == session_id)).scalar_one()
    if count > MAX_LOSSES_PER_SESSION:
        raise Refused(
            f"session {session_id} has uploaded {MAX_LOSSES_PER_SESSION} custom losses, the most "
            "a session may: create each loss once and reuse its handle (a loss traced anew each "
            "step uploads a new graph each time)",
            "session_id",
        )
    return str(made)


def _values(checked: CheckedLoss) -> dict[str, Any]:
    inputs = [{"name": name, "rank": rank} for name, rank in checked.inputs]
    return {"name": checked.name, "inputs": inputs, "graph": checked.graph}


def _replayed(conn: Connection, session_id: str, seq: int, values: Mapping[str, Any]) -> str:
    found = conn.execute(
        select(losses).where(losses.c.session_id == session_id, losses.c.seq == seq)
    ).one()
    if any(getattr(found, key) != value for key, value in values.items()):
        raise Refused(
            f"custom_loss_seq_id {seq} of session {session_id} made another loss "
            f"({found.name!r}): number each new loss of a session anew",
            "custom_loss_seq_id",
        )
    return str(found.id)


def get(conn: Connection, tenant_id: str, loss_id: str) -> StoredLoss:
    row = conn.execute(
        select(losses).where(losses.c.id == loss_id, losses.c.tenant_id == tenant_id)
    ).one_or_none()
    if row is None:
        raise NotFound("custom_loss", loss_id)
    return StoredLoss(row.id, row.session_id, row.name, row.inputs, row.graph)


def for_model(conn: Connection, tenant_id: str, model_id: str, loss_id: str) -> StoredLoss:
    """The loss, refused unless `model_id` is a model of the session that uploaded it."""
    loss = get(conn, tenant_id, loss_id)
    session_id = conn.execute(
        select(models.c.session_id).where(models.c.id == model_id, models.c.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if session_id is None:
        raise NotFound("model", model_id)
    if session_id != loss.session_id:
        raise Refused(
            f"custom loss {loss_id} ({loss.name!r}) was created in session {loss.session_id}; "
            f"model {model_id} is of session {session_id}: create the loss in the model's "
            "session (a loss handle works only with its own session's clients)",
            "loss_fn_config",
        )
    return loss


def check_data(loss: StoredLoss, data: list[Mapping[str, Any]]) -> None:
    """Each datum carries every input the loss reads at its declared rank, and its targets have
    the rank of the loss's logprobs (refused naming the first that does not). The SDK checks the
    same before it sends; the executor checks again with the values."""
    logprobs, *reads = loss.inputs
    for i, datum in enumerate(data):
        given = datum.get("loss_fn_inputs") or {}
        for wanted, key in [(logprobs, "target_tokens"), *((x, x["name"]) for x in reads)]:
            tensor = given.get(key)
            if tensor is None:
                raise Refused(
                    f"data[{i}] has no loss_fn_inputs[{key!r}], which custom loss "
                    f"{loss.name!r} reads",
                    "forward_backward_input",
                )
            shape = tensor.get("shape")
            rank = 1 if shape is None else len(shape)
            if rank != wanted["rank"]:
                raise Refused(
                    f"data[{i}] loss_fn_inputs[{key!r}] has rank {rank}; custom loss "
                    f"{loss.name!r} declared {wanted['name']} with rank {wanted['rank']}",
                    "forward_backward_input",
                )
