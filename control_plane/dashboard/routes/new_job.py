"""The new-job page: pick a ready base, upload a dataset (validated as it is chosen), set the
hyperparameters, submit; the browser then follows the new job's page.

The upload and the submission call the REST routes' own functions (`POST /v1/files`,
`POST /v1/fine_tuning/jobs`), so the page refuses exactly what the API refuses, with the
same messages.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, UploadFile
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from sqlalchemy import Connection

from control_plane import base_catalog, jobs, registry
from control_plane import events as event_repo
from control_plane import files as file_repo
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.method_schemas import DpoMethod, Method
from control_plane.api.routes import files as file_routes
from control_plane.api.routes import fine_tuning, job_grids
from control_plane.api.routes.job_grids import SweepCreate
from control_plane.api.schemas import JobCreate
from control_plane.base_status import BaseStatus
from control_plane.dashboard.render import PageForbidden, PageNotFound, fragment, page
from control_plane.dashboard.sessions import CheckedSession, CurrentSession, PageConn, Session
from control_plane.datasets import DatasetError
from control_plane.hyperparameters import BASE_LEARNING_RATE, Hyperparameters
from control_plane.records import JobRecord
from control_plane.sweeps import SWEEP_KEY

router = APIRouter()

# One line each for the knobs that are LoRA's own (shown under their fields).
EXPLAINED = {
    "lora_rank": "Rank r of the low-rank update B·A: its capacity. 8-64 is usual; the adapter's "
    "size grows linearly with it.",
    "lora_alpha": "Scale of the update (alpha / r multiplies B·A); usually one to two times the rank.",
    "lora_dropout": "Dropout on the adapter's input during training; 0-0.1 helps small datasets.",
    "target_modules": "Which linear layers get an adapter: 'all-linear', or names such as "
    "q_proj, v_proj.",
    "use_dora": "DoRA: learns each weight's magnitude apart from its direction (vLLM cannot "
    "serve DoRA adapters).",
    "use_rslora": "rsLoRA: scales by alpha / √r, so high ranks keep learning.",
    "learning_rate_multiplier": f"Multiplies the base learning rate of {BASE_LEARNING_RATE:g}.",
    "method": "supervised: learn the file's replies (chat, prompt/completion or text); dpo: learn "
    "to prefer preferred_output over non_preferred_output (a preference file).",
    "dpo_beta": "DPO's beta: how strongly the adapter is held near the base while it learns the "
    "preferences; 0.1 is usual.",
}
# Shown first; the rest sit under "More settings".
MAIN_FIELDS = (
    "method",
    "dpo_beta",
    "n_epochs",
    "batch_size",
    "learning_rate_multiplier",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_dora",
    "use_rslora",
    "max_seq_length",
)


@dataclass(frozen=True)
class FieldView:
    """A hyperparameter as the form shows it."""

    name: str
    kind: str  # number | checkbox | select | text
    default: Any
    value: Any
    help: str
    step: str
    choices: list[str]


def _kind(info: FieldInfo) -> tuple[str, str, list[str]]:
    annotation = info.annotation
    if annotation is bool:
        return "checkbox", "", []
    if annotation is int:
        return "number", "1", []
    if annotation is float:
        return "number", "any", []
    if typing.get_origin(annotation) is typing.Literal:
        return "select", "", [str(a) for a in typing.get_args(annotation)]
    return "text", "", []


def _rank(name: str) -> int:
    return MAIN_FIELDS.index(name) if name in MAIN_FIELDS else len(MAIN_FIELDS)


def _fields(values: dict[str, str]) -> tuple[list[FieldView], list[FieldView]]:
    main: list[FieldView] = []
    more: list[FieldView] = []
    # the main fields in MAIN_FIELDS' order (the method first), the others in the model's
    shown_first = sorted(Hyperparameters.model_fields.items(), key=lambda item: _rank(item[0]))
    for name, info in shown_first:
        kind, step, choices = _kind(info)
        default = info.get_default(call_default_factory=True)
        shown = values.get(name, "on" if default is True else default)
        if kind == "checkbox" and values:
            shown = values.get(name) == "on"
        view = FieldView(
            name=name,
            kind=kind,
            default=default,
            value=shown,
            help=EXPLAINED.get(name, info.description or ""),
            step=step,
            choices=choices,
        )
        (main if name in MAIN_FIELDS else more).append(view)
    return main, more


def _same(kind: str, value: Any, default: Any) -> bool:
    if kind == "number":
        try:
            return float(value) == float(default)
        except (TypeError, ValueError):
            return False  # not a number: the API's validation says so
    return bool(value == default)


def requested_hyperparameters(form: dict[str, str]) -> dict[str, Any]:
    """The form's hyperparameters that differ from the defaults (a continued job inherits the
    rest from its parent, as over the API); values stay as typed, for the API to validate."""
    defaults = Hyperparameters().model_dump(mode="json")
    requested: dict[str, Any] = {}
    for name, info in Hyperparameters.model_fields.items():
        kind, _, _ = _kind(info)
        if kind == "checkbox":
            value: Any = form.get(name) == "on"
        else:
            value = form.get(name, "").strip()
            if value == "":
                continue
            if name == "target_modules" and value != "all-linear":
                value = [m.strip() for m in value.split(",") if m.strip()]
        if not _same(kind, value, defaults[name]):
            requested[name] = value
    return requested


SWEEP_ROWS = 3  # hyperparameters the form sweeps at once (the API takes 4)


def sweepable() -> list[str]:
    """What the form can sweep: the numbers, switches and choices, save the method."""
    fields = Hyperparameters.model_fields
    return [n for n, info in fields.items() if n != "method" and _kind(info)[0] != "text"]


def requested_grid(form: dict[str, str]) -> dict[str, list[str]]:
    """The sweep's rows: hyperparameter -> its values as typed (comma-separated), for the API
    to validate; ValueError for a row half filled or a name chosen twice."""
    grid: dict[str, list[str]] = {}
    for row in range(1, SWEEP_ROWS + 1):
        name = form.get(f"sweep_param_{row}", "").strip()
        values = [v.strip() for v in form.get(f"sweep_values_{row}", "").split(",") if v.strip()]
        if not name and not values:
            continue
        if not name or not values:
            raise ValueError(
                f"Sweep row {row}: choose a hyperparameter and give its values, separated by "
                "commas."
            )
        if name in grid:
            raise ValueError(f"Sweep: {name} is chosen in two rows; give all its values in one.")
        grid[name] = values
    return grid


def requested_method(requested: dict[str, Any]) -> Method | None:
    """The form's method (and DPO's beta, shown for DPO only), taken out of `requested` into the
    `method` the API takes; None for supervised training."""
    kind = requested.pop("method", "supervised")
    beta = requested.pop("dpo_beta", None)
    if kind == "supervised":
        return None
    return Method(
        type=kind, dpo=DpoMethod(hyperparameters=None if beta is None else {"beta": beta})
    )


async def form_fields(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


FormFields = Annotated[dict[str, str], Depends(form_fields)]


def _new_job_page(
    request: Request,
    session: Session,
    conn: Connection,
    values: dict[str, str],
    *,
    error: str | None = None,
    status_code: int = 200,
    like: tuple[str, list[str]] | None = None,
) -> Response:
    bases = [b for b in base_catalog.list_base_models(conn) if b.status == BaseStatus.READY]
    adapters, _ = registry.list_adapters(conn, session.principal.tenant_id, after=None, limit=100)
    main, more = _fields(values)
    return page(
        request,
        "new_job.html",
        session,
        status_code=status_code,
        bases=bases,
        adapters=adapters,
        main_fields=main,
        more_fields=more,
        sweepable=sweepable(),
        sweep_rows=SWEEP_ROWS,
        sweep_typed=any(v.strip() for k, v in values.items() if k.startswith("sweep_")),
        values=values,
        error=error,
        like=like,
    )


@router.get("/jobs/new")
def new_job_form(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    like: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The form; `?like=ftjob-...` fills it with that job's base, dataset, adapter name,
    starting point and hyperparameters (a rerun with a change)."""
    if not like:
        return _new_job_page(request, session, conn, {})
    job = jobs.get_job(conn, session.principal.tenant_id, like)
    if job is None:
        raise PageNotFound()
    values, notes = _values_like(conn, session.principal.tenant_id, job)
    return _new_job_page(request, session, conn, values, like=(job.id, notes))


def _continued(conn: Connection, job_id: str) -> bool:
    """Whether the job was created to continue from a version (its first event says so)."""
    first = event_repo.list_events(conn, job_id, after=None, limit=1, newest_first=False)
    return bool(first and (first[0].data or {}).get("parent_version_id"))


def _values_like(
    conn: Connection, tenant_id: str, job: JobRecord
) -> tuple[dict[str, str], list[str]]:
    """The form's fields as `job` was submitted, and what of it the form cannot carry over."""
    notes: list[str] = []
    base = base_catalog.get_base_model(conn, job.base_model_id)
    values = {"model": base.name if base else "", "adapter_name": job.adapter_name or ""}
    if base is None or base.status != BaseStatus.READY:
        notes.append("its base model is not ready now: pick another")
    if file_repo.get_file(conn, tenant_id, job.training_file_id) is not None:
        values["training_file"] = job.training_file_id
    else:
        notes.append("its training file was deleted: choose a dataset")
    if job.validation_file_id:
        hp = job.hyperparameters
        watched = (
            hp.get("early_stopping_patience") or hp.get("sweep_median_stopping")
        ) and not hp.get("eval_fraction")
        notes.append(
            "its validation file is not carried over (the form takes none)"
            + (": set eval_fraction for early stopping to watch" if watched else "")
        )
    parent = (
        registry.get_version_by_id(conn, job.parent_version_id) if job.parent_version_id else None
    )
    if parent is not None:
        values["continue_from"] = parent.model_id
    elif _continued(conn, job.id):
        notes.append(
            "the adapter version it continued from was deleted: this job would start a new "
            "adapter (set continue_from to another version to go on from one)"
        )
    for name, info in Hyperparameters.model_fields.items():
        if name not in job.hyperparameters:
            continue
        value = job.hyperparameters[name]
        if _kind(info)[0] == "checkbox":
            if value is True:
                values[name] = "on"
        elif isinstance(value, list):
            values[name] = ", ".join(str(v) for v in value)
        else:
            values[name] = str(value)
    return values, notes


@router.post("/jobs/new/dataset")
def upload_dataset(session: CheckedSession, services: ServicesDep, file: UploadFile) -> Response:
    """Validate and store the chosen dataset; the answer is the result panel (counts, or the
    line and reason) and, on success, the file id the job form submits."""
    try:
        caller = require_writer(session.principal)
        stored = file_routes.upload_file(services, caller, file, "fine-tune")
    except ApiError as exc:
        cause = exc.__cause__
        line = cause.line if isinstance(cause, DatasetError) else None
        reason = cause.detail if isinstance(cause, DatasetError) else exc.message
        return fragment(
            "_dataset_result.html", ok=False, filename=file.filename, line=line, reason=reason
        )
    return fragment("_dataset_result.html", ok=True, filename=file.filename, file=stored)


@router.post("/jobs/new")
def submit_job(
    request: Request,
    session: CheckedSession,
    conn: PageConn,
    services: ServicesDep,
    form: FormFields,
) -> Response:
    try:
        caller = require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(exc.message) from None
    training_file = form.get("training_file", "").strip()
    if not training_file:
        return _new_job_page(
            request,
            session,
            conn,
            form,
            error="Choose a dataset first: a job starts only from a file that passed validation.",
            status_code=400,
        )
    try:
        requested = requested_hyperparameters(form)
        grid, sweep_name = requested_grid(form), form.get("sweep_name", "").strip()
        for name in grid:  # the grid's values, not the field's
            requested.pop(name, None)
        body = JobCreate(
            model=form.get("model", ""),
            training_file=training_file,
            method=requested_method(requested),
            hyperparameters=requested,
            adapter_name=form.get("adapter_name", "").strip() or None,
            continue_from=form.get("continue_from", "").strip() or None,
        )
        if grid or sweep_name:
            if not (grid and sweep_name):
                raise ValueError(
                    "A sweep needs a name and at least one hyperparameter with its values."
                )
            sweep = SweepCreate(name=sweep_name, job=body, grid=grid)
            job_grids.create_sweep(sweep, conn, caller, services, idempotency_key=None)
            return RedirectResponse(f"/jobs?q={quote(SWEEP_KEY + '=' + sweep_name)}", 303)
        job = fine_tuning.create_job(body, conn, caller, services, idempotency_key=None)
    except ApiError as exc:
        return _new_job_page(request, session, conn, form, error=exc.message, status_code=400)
    except ValidationError as exc:  # JobCreate's or SweepCreate's: one sentence, as the API's
        message, _ = describe_validation_errors(list(exc.errors()))
        return _new_job_page(request, session, conn, form, error=message, status_code=400)
    except ValueError as exc:  # the form's own (`requested_grid`)
        return _new_job_page(request, session, conn, form, error=str(exc), status_code=400)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)
