"""Custom losses run on the server (`create_custom_loss`, `loss_fn: custom`), driven by the
official `tinker` SDK against the real executor on the tiny test base: the SDK traces the loss,
uploads its graph, and each `forward_backward_custom` is then one call that the executor runs
(forward, the loss rebuilt from the graph, backward), where the SDK would otherwise ask a
forward, compute the loss and its gradient itself and send a second call. The numbers are the
built-in losses' for the same formulas; a graph the server does not run, a loss of another
session and data the loss cannot read are refused with their reason and nothing kept; a loss
that fails as it runs fails its own call as the caller's, and the model trains on as if it had
not been asked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from sqlalchemy import Engine, text
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, SEQUENCE, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

TARGETS = SEQUENCE[1:]
STEP = types.AdamParams(learning_rate=1e-2)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    on = getattr(request, "param", True)
    return tinker_settings(tmp_path).model_copy(update={"tinker_custom_losses_on_server": on})


@pytest.fixture
def http(live_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_url + "/api/v1", timeout=60) as client:
        yield client


def neg_ll(logprobs: torch.Tensor, weights: torch.Tensor) -> Any:
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


def clipped_ratio(logprobs: torch.Tensor, sampled: torch.Tensor, advantages: torch.Tensor) -> Any:
    """PPO's loss (clip 0.8 to 1.2), as the built-in `ppo` computes it, and the share of
    positions the clip holds, a `:mean` metric."""
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    held = (clipped != ratio).float().mean()
    return loss, {"custom/clipped:mean": held.detach()}


def _client(service: tinker.ServiceClient, base: str) -> Any:
    return service.create_lora_training_client(base_model=base, rank=4, seed=0).result(timeout=120)


def _loss(training: Any) -> float:
    return float(training.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def _kinds(engine: Engine, model_id: str) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT kind FROM interactive_calls WHERE model_id = :m ORDER BY seq"),
            {"m": model_id},
        )
        return [row.kind for row in rows]


def _stored_losses(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM interactive_custom_losses")).scalar_one()
        )


def test_a_custom_loss_runs_on_the_server_in_one_call_with_the_builtin_losses_numbers(
    services: Any, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        builtin, custom = _client(service, executor), _client(service, executor)
        handle = service.create_custom_loss(
            neg_ll, input_ranks={"logprobs": 1, "weights": 1}
        ).result(timeout=60)
        assert handle.loss_id is not None and handle.loss_id.startswith("closs-")

        # Cross entropy written as a custom loss: the same logprobs, loss and step.
        for _ in range(2):
            reference = builtin.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            out = custom.forward_backward_custom([DATUM], handle).result(timeout=120)
            assert out.metrics["custom/nll:sum"] == pytest.approx(
                reference.metrics["loss:sum"], rel=1e-5
            )
            assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-5)
            assert out.loss_fn_outputs[0]["logprobs"].data == pytest.approx(
                reference.loss_fn_outputs[0]["logprobs"].data, rel=1e-5, abs=1e-6
            )
            builtin.optim_step(STEP).result(timeout=120)
            custom.optim_step(STEP).result(timeout=120)
        # A forward with the loss scores without training: the built-in's numbers, no step.
        scored = custom.forward([DATUM], "custom", {"loss_id": handle.loss_id}).result(timeout=120)
        plain = builtin.forward([DATUM], "cross_entropy").result(timeout=120)
        assert scored.metrics["custom/nll:sum"] == pytest.approx(
            plain.metrics["loss:sum"], rel=1e-5
        )
        # One forward_backward a step, none of the client-side path's forwards.
        assert _kinds(services.engine, custom.model_id) == [
            "create_model",
            "forward_backward",
            "optim_step",
            "forward_backward",
            "optim_step",
            "forward",
        ]
        assert _loss(custom) == pytest.approx(_loss(builtin), rel=1e-4)

        # An RL loss with settings written into it: the built-in ppo's loss and step, and a
        # `:mean` metric averaged over the datums.
        sampled_lp = builtin.forward([DATUM], "cross_entropy").result(timeout=120)
        current = torch.tensor(sampled_lp.loss_fn_outputs[0]["logprobs"].data)
        sampled = (current + torch.linspace(-0.4, 0.4, len(TARGETS))).tolist()
        advantages = [1.0 if i % 3 else -1.0 for i in range(len(TARGETS))]
        rl = types.Datum(
            model_input=DATUM.model_input,
            loss_fn_inputs={
                "target_tokens": TARGETS,
                "logprobs": sampled,
                "advantages": advantages,
            },
        )
        renamed = types.Datum(
            model_input=DATUM.model_input,
            loss_fn_inputs={
                "target_tokens": TARGETS,
                "sampled": torch.tensor(sampled),
                "advantages": advantages,
            },
        )
        ppo_handle = service.create_custom_loss(
            clipped_ratio, input_ranks={"logprobs": 1, "sampled": 1, "advantages": 1}
        ).result(timeout=60)
        reference = builtin.forward_backward([rl, rl], "ppo").result(timeout=120)
        out = custom.forward_backward_custom([renamed, renamed], ppo_handle).result(timeout=120)
        assert out.metrics["loss:sum"] == pytest.approx(reference.metrics["loss:sum"], rel=1e-4)
        ratio = torch.exp(current - torch.tensor(sampled))
        held = float(((ratio < 0.8) | (ratio > 1.2)).float().mean())
        assert 0 < held < 1
        assert out.metrics["custom/clipped:mean"] == pytest.approx(held, rel=1e-5)
        builtin.optim_step(STEP).result(timeout=120)
        custom.optim_step(STEP).result(timeout=120)
        assert _loss(custom) == pytest.approx(_loss(builtin), rel=1e-4)


def _graph(fn: Any, ranks: dict[str, int]) -> dict[str, Any]:
    return encode_graph(trace_loss(fn, ranks, "s")).model_dump(mode="json")


def _create(
    http: httpx.Client, key: str, session: str, seq: int, graph: dict[str, Any], name: str = "l"
) -> httpx.Response:
    body = {
        "session_id": session,
        "custom_loss_seq_id": seq,
        "name": name,
        "inputs": [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}],
        "graph": graph,
    }
    return http.post("/create_custom_loss", json=body, headers={"X-API-Key": "tml-" + key})


def test_a_graph_the_server_does_not_run_is_refused_and_an_upload_sent_again_finds_its_loss(
    services: Any, http: httpx.Client, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    session = http.post("/create_session", json={"tags": []}, headers=headers).json()["session_id"]
    graph = _graph(neg_ll, {"logprobs": 1, "weights": 1})

    # A node calling what no loss needs, written by hand (the SDK would not send it).
    evil = {**graph, "nodes": [dict(node) for node in graph["nodes"]]}
    mul = next(node for node in evil["nodes"] if node["target"] == "operator.mul")
    mul["target"] = "builtins.eval"
    refused = _create(http, tenant_a.member, session, 0, evil)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert "builtins.eval" in message and mul["name"] in message
    assert _stored_losses(services.engine) == 0

    made = _create(http, tenant_a.member, session, 0, graph)
    assert made.status_code == 200, made.text
    loss_id = made.json()["request_id"]
    again = _create(http, tenant_a.member, session, 0, graph)
    assert again.json()["request_id"] == loss_id  # the request sent again: the same loss
    other = _graph(
        lambda logprobs, weights: ((logprobs * weights).sum(), {}),
        {
            "logprobs": 1,
            "weights": 1,
        },
    )
    taken = _create(http, tenant_a.member, session, 0, other)
    assert taken.status_code == 400 and "custom_loss_seq_id 0" in taken.json()["error"]["message"]
    assert _stored_losses(services.engine) == 1

    answered = http.post("/retrieve_future", json={"request_id": loss_id}, headers=headers)
    assert answered.json() == {"type": "create_custom_loss", "loss_id": loss_id}
    elsewhere = http.post(
        "/retrieve_future",
        json={"request_id": loss_id},
        headers={"X-API-Key": "tml-" + tenant_b.member},
    )
    assert elsewhere.status_code == 404
    foreign = _create(http, tenant_b.member, session, 1, graph)
    assert foreign.status_code == 404  # another tenant's session


def mismatched(logprobs: torch.Tensor, weights: torch.Tensor) -> Any:
    return (logprobs * weights).sum(), {}


def test_a_loss_that_fails_fails_its_own_call_and_a_foreign_or_misfed_loss_is_refused(
    services: Any, live_url: str, http: httpx.Client, tenant_a: TenantKeys, executor: str
) -> None:
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    with sdk_service(live_url, tenant_a.member) as service:
        training, reference = _client(service, executor), _client(service, executor)
        handle = service.create_custom_loss(
            mismatched, input_ranks={"logprobs": 1, "weights": 1}
        ).result(timeout=60)
        short = types.Datum(
            model_input=DATUM.model_input,
            loss_fn_inputs={"target_tokens": TARGETS, "weights": [1.0, 2.0]},
        )
        with pytest.raises(tinker.RequestFailedError) as failed:
            training.forward_backward_custom([short], handle).result(timeout=120)
        message = str(failed.value)
        assert "mismatched" in message and "mul" in message  # the loss and the node named
        # The failed call added nothing: the next step is the reference's first.
        for client in (training, reference):
            client.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            client.optim_step(STEP).result(timeout=120)
        assert _loss(training) == pytest.approx(_loss(reference), rel=1e-5)

        # The API checks what the SDK checks before it sends: the loss's session, its inputs.
        def ask(datum: dict[str, Any], loss_id: str) -> httpx.Response:
            body = {
                "model_id": training.model_id,
                "forward_backward_input": {
                    "data": [datum],
                    "loss_fn": "custom",
                    "loss_fn_config": {"loss_id": loss_id},
                },
            }
            return http.post("/forward_backward", json=body, headers=headers)

        targets = {"data": TARGETS, "dtype": "int64", "shape": [len(TARGETS)]}
        weights = {"data": [1.0] * len(TARGETS), "dtype": "float32", "shape": [len(TARGETS)]}
        tokens = {"chunks": [{"type": "encoded_text", "tokens": SEQUENCE[:-1]}]}
        datum = {
            "model_input": tokens,
            "loss_fn_inputs": {"target_tokens": targets, "weights": weights},
        }
        with sdk_service(live_url, tenant_a.member) as other_session:
            foreign = other_session.create_custom_loss(
                neg_ll, input_ranks={"logprobs": 1, "weights": 1}
            ).result(timeout=60)
        assert foreign.loss_id is not None and handle.loss_id is not None
        before = _kinds(services.engine, training.model_id)
        refused = ask(datum, foreign.loss_id)
        assert refused.status_code == 400 and "session" in refused.json()["error"]["message"]
        unfed = {
            **datum,
            "loss_fn_inputs": {"target_tokens": datum["loss_fn_inputs"]["target_tokens"]},
        }
        lacking = ask(unfed, handle.loss_id)
        assert lacking.status_code == 400
        assert "loss_fn_inputs['weights']" in lacking.json()["error"]["message"]
        assert ask(datum, "closs-000000000000000000000000").status_code == 404
        assert _kinds(services.engine, training.model_id) == before  # nothing queued


@pytest.mark.parametrize("settings", [False], indirect=True)
def test_with_custom_losses_off_the_sdk_runs_them_itself(
    services: Any, live_url: str, http: httpx.Client, tenant_a: TenantKeys, executor: str
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = _client(service, executor)
        handle = service.create_custom_loss(
            neg_ll, input_ranks={"logprobs": 1, "weights": 1}
        ).result(timeout=60)
        assert handle.loss_id is None  # nothing uploaded
        out = training.forward_backward_custom([DATUM], handle).result(timeout=120)
        assert out.metrics["custom/nll:sum"] > 0
        # The client-side path: a forward for the logprobs, then the gradient sent back.
        assert _kinds(services.engine, training.model_id) == [
            "create_model",
            "forward",
            "forward_backward",
        ]
        session = service.holder.get_session_id()
    refused = _create(
        http, tenant_a.member, session, 0, _graph(neg_ll, {"logprobs": 1, "weights": 1})
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "custom_losses_run_on_the_client"
    assert _stored_losses(services.engine) == 0
