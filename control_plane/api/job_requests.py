"""What a new fine-tuning job is checked against before a row is written: its hyperparameters,
its base, its files and eval set, `continue_from`, its adapter name and serving target.

`new_job` is the one place: `POST /v1/fine_tuning/jobs` (one job) and `POST
/v1/fine_tuning/sweeps` (a grid of them, all or none) both build their rows with it, so a job
of a sweep is refused for exactly what would refuse it alone. Each refusal is an `ApiError`
(400, with what to change and the field that says it).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection

from control_plane import base_catalog, jobs, registry, tenants, validation
from control_plane.api.deps import allow_priority
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.schemas import IMPORT_FAILED_FOR_TENANTS, JobCreate
from control_plane.base_status import BaseStatus
from control_plane.hyperparameters import Hyperparameters
from control_plane.services import Services
from control_plane.serving import ServingTarget, serving_problems
from control_plane.tenants import Principal

_log = logging.getLogger(__name__)


def _hyperparameters(raw: dict[str, Any]) -> Hyperparameters:
    try:
        return Hyperparameters(**raw)
    except ValidationError as exc:
        message, param = describe_validation_errors(list(exc.errors()))
        raise ApiError(
            400,
            "invalid_hyperparameters",
            f"hyperparameters: {message}",
            f"hyperparameters.{param}" if param else "hyperparameters",
        ) from None
    except TypeError as exc:
        raise ApiError(
            400, "invalid_hyperparameters", f"hyperparameters: {exc}", "hyperparameters"
        ) from None


def _parent(
    conn: Connection, tenant_id: str, ref: str, base_model_id: str
) -> registry.AdapterVersionRecord:
    """The version `continue_from` names, on the job's base; 400 with the reason otherwise."""
    try:
        return registry.resolve_parent(conn, tenant_id, ref, base_model_id=base_model_id)
    except registry.RegistryError as exc:
        raise ApiError(400, exc.code, f"continue_from: {exc.message}", "continue_from") from None


def _adapter_name(name: str) -> None:
    """Refuse now, not after the training, a name the registry would refuse at publication."""
    try:
        registry.validate_adapter_name(name)
    except registry.RegistryError as exc:
        raise ApiError(
            400,
            exc.code,
            f"adapter_name: {exc.message}; the registry would refuse to publish under it",
            "adapter_name",
        ) from None


def _files_for_training(
    conn: Connection, tenant_id: str, body: JobCreate, hp: Hyperparameters
) -> None:
    """400 for a file the job names that it could not train on (`validation.check_job_file`),
    or an eval set or a sweep it needs and lacks (`validation.check_eval_set`,
    `check_in_a_sweep`)."""
    named = [("training_file", body.training_file), ("validation_file", body.validation_file)]
    try:
        validation.check_eval_set(hp, body.validation_file)
        validation.check_in_a_sweep(hp, body.metadata)
        for param, file_id in named:
            if file_id is not None:
                validation.check_job_file(conn, tenant_id, file_id, param, hp.method)
    except validation.JobFileError as exc:
        raise ApiError(400, exc.code, exc.message, exc.param) from None


def new_job(
    body: JobCreate,
    conn: Connection,
    caller: Principal,
    services: Services,
    idempotency_key: str | None,
    *,
    check_priority: bool = True,
) -> jobs.NewJob:
    """The job `body` asks for, checked as a create checks it (400 with what to change; 403
    for a priority above the tenant's cap, unless `check_priority` is off)."""
    if body.adapter_name is not None:
        _adapter_name(body.adapter_name)
    if check_priority:
        allow_priority(conn, caller, body.priority, services)
    requested = body.merged_hyperparameters()
    hp = _hyperparameters(requested)
    base = base_catalog.get_base_model(conn, body.model)
    if base is None:
        raise ApiError(
            400,
            "model_not_found",
            f"model: no base model named {body.model!r}; list them with GET /v1/models",
            "model",
        )
    if base.status != BaseStatus.READY:
        failure = (
            f"its import failed: {base.error_message}; register it again"
            if tenants.is_operator_tenant(
                conn, caller.tenant_id, services.settings.platform_operator_tenants
            )
            else IMPORT_FAILED_FOR_TENANTS
        )
        reasons: dict[str, str] = {
            BaseStatus.REGISTERING: "its checkpoint is still being imported; submit again once "
            f"GET /v1/base_models/{base.name} says ready",
            BaseStatus.FAILED: failure,
        }
        why = reasons.get(base.status, "not ready")
        raise ApiError(
            400,
            "model_not_ready",
            f"model: base model {base.name} is {base.status}: {why}",
            "model",
        )
    _files_for_training(conn, caller.tenant_id, body, hp)
    parent = None
    if body.continue_from is not None:
        parent = _parent(conn, caller.tenant_id, body.continue_from, base.id)
        try:
            inherited = registry.continued_hyperparameters(parent, requested)
        except registry.RegistryError as exc:
            raise ApiError(400, exc.code, exc.message, exc.param) from None
        hp = _hyperparameters(inherited)
    if body.serving_target is not None:
        target = ServingTarget(
            max_lora_rank=body.serving_target.max_lora_rank,
            served_model=body.serving_target.served_model,
        )
        if problems := serving_problems(hp, base.name, target):
            raise ApiError(
                400,
                "unservable_adapter",
                "serving_target would refuse this job's adapter: " + "; ".join(problems),
                "serving_target",
            )
    return jobs.NewJob(
        tenant_id=caller.tenant_id,
        base_model_id=base.id,
        training_file_id=body.training_file,
        validation_file_id=body.validation_file,
        hyperparameters=hp.model_dump(mode="json"),
        suffix=body.suffix,
        adapter_name=body.adapter_name,
        parent_version_id=parent.id if parent else None,
        priority=body.priority,
        max_attempts=body.max_attempts or services.settings.max_attempts,
        idempotency_key=idempotency_key,
        user_metadata=body.metadata or None,
    )


def dispatch_validations(services: Services, job_ids: list[str]) -> None:
    """Hand committed jobs to validation. A dispatch that fails (the broker down) is logged,
    not answered: the jobs are written, and `loraforge.redispatch_validation` sends again what
    stays in `validating_files` past two minutes."""
    for job_id in job_ids:
        try:
            services.dispatch_validation(job_id)
        except Exception:
            _log.warning(
                "validation of %s not dispatched; it will be re-sent", job_id, exc_info=True
            )
