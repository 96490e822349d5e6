"""A job request's hash, which an `Idempotency-Key` replay is matched on, stays what it was for
requests sent before a field was added to the hyperparameters with its default."""

from __future__ import annotations

from control_plane.hyperparameters import Hyperparameters
from control_plane.jobs import NewJob


def _job(hyperparameters: dict[str, object]) -> NewJob:
    return NewJob(
        tenant_id="tenant-a",
        base_model_id="base-1",
        training_file_id="file-1",
        validation_file_id=None,
        hyperparameters=hyperparameters,
    )


def test_a_supervised_request_hashes_as_it_did_before_dpo_and_a_dpo_one_does_not() -> None:
    now = Hyperparameters().model_dump(mode="json")
    before = {k: v for k, v in now.items() if k not in ("method", "dpo_beta")}
    assert _job(now).request_hash() == _job(before).request_hash()
    dpo = Hyperparameters(method="dpo").model_dump(mode="json")
    assert _job(dpo).request_hash() != _job(now).request_hash()
    sharper = Hyperparameters(method="dpo", dpo_beta=0.3).model_dump(mode="json")
    assert _job(sharper).request_hash() != _job(dpo).request_hash()
    other = Hyperparameters(n_epochs=5, target_modules=["q_proj"]).model_dump(mode="json")
    assert _job(other).request_hash() != _job(now).request_hash()


def test_a_request_hashes_as_it_did_before_early_stopping_unless_it_stops_early() -> None:
    now = Hyperparameters().model_dump(mode="json")
    added = ("early_stopping_patience", "early_stopping_threshold", "sweep_median_stopping")
    before = {k: v for k, v in now.items() if k not in added}
    assert _job(now).request_hash() == _job(before).request_hash()
    watched = Hyperparameters(eval_every_steps=5).model_dump(mode="json")
    stopping = Hyperparameters(eval_every_steps=5, early_stopping_patience=2)
    assert _job(stopping.model_dump(mode="json")).request_hash() != _job(watched).request_hash()
    stricter = stopping.model_copy(update={"early_stopping_threshold": 0.1})
    assert (
        _job(stricter.model_dump(mode="json")).request_hash()
        != _job(stopping.model_dump(mode="json")).request_hash()
    )
