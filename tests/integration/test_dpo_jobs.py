"""DPO jobs (OpenAI's `method={"type": "dpo"}`) through the official `openai` client, against the
real API on a real socket, real PostgreSQL, the object store and a celery worker.

A preference file is validated at upload like any dataset (its examples are pairs); a DPO job
stores `method` and `dpo_beta` among its hyperparameters, where the trainer reads them, and
answers OpenAI's `method` shape; a job whose method does not train on its files is refused
before anything is written, or fails in validation when a file's format is only known then.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types import FileObject
from sqlalchemy import text

from control_plane import jobs
from control_plane.hyperparameters import Hyperparameters
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.factories import store_file

PAIRS = [
    {
        "input": {
            "messages": [
                {"role": "system", "content": "Answer kindly."},
                {"role": "user", "content": f"What is {i} + {i}?"},
            ],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": f"{i} + {i} is {2 * i}."}],
        "non_preferred_output": [{"role": "assistant", "content": "Work it out yourself."}],
    }
    for i in range(12)
]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"Say {i}"},
            {"role": "assistant", "content": str(i)},
        ]
    }
    for i in range(12)
]
WHAT_DPO_TAKES = '"preferred_output": [...], "non_preferred_output": [...]} lines'


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def estimated_tokens(pair: dict[str, Any]) -> int:
    """The upload's estimate for a pair: UTF-8 bytes of the conversation and both replies / 4."""
    messages = [
        *pair["input"]["messages"],
        *pair["preferred_output"],
        *pair["non_preferred_output"],
    ]
    return -(-sum(len(m["content"].encode()) for m in messages) // 4)


@pytest.fixture
def client(live_url: str, tenant_a: TenantKeys) -> openai.OpenAI:
    return openai.OpenAI(api_key=tenant_a.admin, base_url=f"{live_url}/v1", max_retries=0)


def upload(client: openai.OpenAI, records: list[dict[str, Any]], name: str) -> FileObject:
    return client.files.create(file=(name, jsonl(records)), purpose="fine-tune")


def counts(services: Services) -> dict[str, int]:
    with services.engine.connect() as conn:
        return {
            table: int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)
            for table in ("files", "jobs", "job_events")
        }


def stored_hyperparameters(services: Services, tenant_id: str, job_id: str) -> dict[str, Any]:
    with services.engine.connect() as conn:
        job = jobs.get_job(conn, tenant_id, job_id)
    assert job is not None
    return job.hyperparameters


def wait_for(client: openai.OpenAI, job_id: str, wanted: set[str]) -> Any:
    deadline = time.monotonic() + 30
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in wanted:
        assert time.monotonic() < deadline, f"job {job_id} never reached {wanted}: {job}"
        time.sleep(0.1)
    return job


def refused(create: Any, **body: Any) -> dict[str, Any]:
    """The error object of the 400 that `create(**body)` answers (OpenAI's envelope)."""
    with pytest.raises(openai.BadRequestError) as caught:
        create(**body)
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    return error


# --- accepted --------------------------------------------------------------------------------


def test_a_preference_file_is_validated_at_upload_and_counted_in_pairs(
    client: openai.OpenAI,
) -> None:
    uploaded = upload(client, PAIRS, "prefs.jsonl").to_dict()
    assert (uploaded["format"], uploaded["examples"]) == ("preference", 12)
    assert uploaded["tokens"] == sum(estimated_tokens(p) for p in PAIRS)


def test_a_dpo_job_stores_its_method_and_beta_for_the_trainer_and_answers_openais_shape(
    client: openai.OpenAI, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    training = upload(client, PAIRS, "prefs.jsonl")
    held_out = upload(client, PAIRS[:3], "prefs-eval.jsonl")
    created = client.fine_tuning.jobs.create(
        model=base_name,
        training_file=training.id,
        validation_file=held_out.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}},
    )
    stored = stored_hyperparameters(services, tenant_a.tenant_id, created.id)
    assert (stored["method"], stored["dpo_beta"], stored["n_epochs"]) == ("dpo", 0.25, 1)
    trainer_reads = Hyperparameters(**stored)
    assert (trainer_reads.method, trainer_reads.dpo_beta) == ("dpo", 0.25)

    job = wait_for(client, created.id, {"queued", "failed"})
    assert job.status == "queued", job.error
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.supervised is None and job.method.dpo is not None
    answered = job.method.dpo.hyperparameters
    assert answered is not None
    assert (answered.beta, answered.n_epochs, answered.batch_size) == (0.25, 1, 8)
    assert answered.learning_rate_multiplier == 1.0
    assert "method" not in answered.to_dict() and "dpo_beta" not in answered.to_dict()


@pytest.mark.parametrize("beta", ["auto", None])
def test_a_dpo_job_without_beta_takes_the_default_and_keeps_its_eval_fraction(
    client: openai.OpenAI,
    services: Services,
    tenant_a: TenantKeys,
    base_name: str,
    beta: str | None,
) -> None:
    training = upload(client, PAIRS, "prefs.jsonl")
    own: dict[str, Any] = {"eval_fraction": 0.25}  # loraforge's own, beside OpenAI's
    if beta is not None:
        own["beta"] = beta
    method: Any = {"type": "dpo", "dpo": {"hyperparameters": own}}
    job = client.fine_tuning.jobs.create(model=base_name, training_file=training.id, method=method)
    stored = stored_hyperparameters(services, tenant_a.tenant_id, job.id)
    assert (stored["method"], stored["dpo_beta"], stored["eval_fraction"]) == ("dpo", 0.1, 0.25)
    assert job.method is not None and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.1


def test_a_supervised_job_stores_and_answers_the_supervised_method(
    client: openai.OpenAI, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    chat = upload(client, CHAT, "chat.jsonl")
    for method in (
        None,
        {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    ):
        extra: dict[str, Any] = {} if method is None else {"method": method}
        job = client.fine_tuning.jobs.create(model=base_name, training_file=chat.id, **extra)
        assert stored_hyperparameters(services, tenant_a.tenant_id, job.id)["method"] == (
            "supervised"
        )
        answered = client.fine_tuning.jobs.retrieve(job.id).method
        assert answered is not None and answered.type == "supervised" and answered.dpo is None
        assert answered.supervised is not None and answered.supervised.hyperparameters is not None
        given = answered.supervised.hyperparameters.to_dict()
        assert "beta" not in given and "dpo_beta" not in given and "method" not in given
        assert wait_for(client, job.id, {"queued", "failed"}).status == "queued"


# --- refused at create, nothing written ------------------------------------------------------


def test_a_supervised_job_on_a_preference_file_is_refused_and_told_to_ask_for_dpo(
    client: openai.OpenAI, services: Services, base_name: str
) -> None:
    prefs = upload(client, PAIRS, "prefs.jsonl")
    chat = upload(client, CHAT, "chat.jsonl")
    before = counts(services)
    for body in (
        {"training_file": prefs.id},
        {"training_file": chat.id, "validation_file": prefs.id},
        {"training_file": prefs.id, "method": {"type": "supervised"}},
    ):
        error = refused(client.fine_tuning.jobs.create, model=base_name, **body)
        param = "validation_file" if "validation_file" in body else "training_file"
        assert (error["code"], error["param"]) == ("invalid_file_format", param)
        assert error["message"].startswith(
            f"{param}: file {prefs.id} (prefs.jsonl) holds preference"
        )
        assert 'pass method={"type": "dpo"} to train on them' in error["message"]
    assert counts(services) == before


def test_a_dpo_job_on_a_chat_file_is_refused_with_what_dpo_takes(
    client: openai.OpenAI, services: Services, base_name: str
) -> None:
    prefs = upload(client, PAIRS, "prefs.jsonl")
    chat = upload(client, CHAT, "chat.jsonl")
    before = counts(services)
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    for body in (
        {"training_file": chat.id},
        {"training_file": prefs.id, "validation_file": chat.id},
    ):
        error = refused(client.fine_tuning.jobs.create, model=base_name, method=dpo, **body)
        param = "validation_file" if "validation_file" in body else "training_file"
        assert (error["code"], error["param"]) == ("invalid_file_format", param)
        assert error["message"].startswith(f"{param}: file {chat.id} (chat.jsonl) is in the 'chat'")
        assert "a DPO job (method type 'dpo') trains on preference pairs" in error["message"]
        assert WHAT_DPO_TAKES in error["message"]
    assert counts(services) == before


REFUSED_METHODS = [
    # beta on a supervised job, wherever it is put
    (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.2}}}},
        "method.supervised.hyperparameters",
        "beta is DPO's own hyperparameter, for a DPO job only",
    ),
    ({"hyperparameters": {"beta": 0.2}}, "hyperparameters", "beta is DPO's own hyperparameter"),
    # the method's own names are not hyperparameters
    ({"hyperparameters": {"method": "dpo"}}, "hyperparameters", "the training method is"),
    (
        {"hyperparameters": {"dpo_beta": 0.2}},
        "hyperparameters",
        'DPO\'s beta is given as method={"type": "dpo", "dpo": {"hyperparameters": {"beta"',
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"dpo_beta": 0.2}}}},
        "method.dpo.hyperparameters",
        "DPO's beta is given as",
    ),
    # a block of the other type
    (
        {"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.2}}}},
        "method",
        "method.dpo is given but method.type is 'supervised': set type 'dpo'",
    ),
    (
        {"method": {"dpo": {}}},  # no type: supervised
        "method",
        "method.dpo is given but method.type is 'supervised'",
    ),
    (
        {"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}},
        "method",
        "method.supervised is given but method.type is 'dpo': give a DPO job's hyperparameters "
        "in method.dpo.hyperparameters",
    ),
    # a beta DPO cannot use
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
        "method.dpo.hyperparameters",
        "beta: Input should be greater than 0",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 11}}}},
        "method.dpo.hyperparameters",
        "beta: Input should be less than or equal to 10",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}},
        "method.dpo.hyperparameters",
        "beta: Input should be a valid number",
    ),
    (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": True}}}},
        "method.dpo.hyperparameters",
        "beta: Input should be a number, not true",
    ),
    ({"method": {"type": "reinforcement"}}, "method.type", "Input should be 'supervised' or"),
]


@pytest.mark.parametrize(("body", "param", "message"), REFUSED_METHODS)
def test_a_method_that_does_not_hold_together_is_refused_with_where_it_goes(
    client: openai.OpenAI,
    services: Services,
    base_name: str,
    body: dict[str, Any],
    param: str,
    message: str,
) -> None:
    # the file fits the method the body asks for, so the method alone is refused
    wants_dpo = body.get("method", {}).get("type") == "dpo"
    training = upload(client, PAIRS if wants_dpo else CHAT, "train.jsonl")
    before = counts(services)
    error = refused(
        client.fine_tuning.jobs.create, model=base_name, training_file=training.id, **body
    )
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert error["message"].startswith(f"{param}: ")
    assert message in error["message"]
    assert counts(services) == before


# --- refused at upload, nothing stored --------------------------------------------------------


def pair(**changes: Any) -> dict[str, Any]:
    """The first pair with top-level keys replaced (None: left out)."""
    return {k: v for k, v in {**PAIRS[0], **changes}.items() if v is not None}


USER = {"role": "user", "content": "Hello"}
BAD_LINES = [
    (pair(non_preferred_output=None), "missing key 'non_preferred_output'"),
    (pair(input=None), "missing key 'input'"),
    (pair(preferred_output=[]), "'preferred_output' must be a non-empty array of assistant"),
    (
        pair(non_preferred_output=[{"role": "assistant", "content": "  "}]),
        "'non_preferred_output' is empty: the reply needs non-empty content",
    ),
    (
        pair(preferred_output=[{"role": "user", "content": "Hi"}]),
        "preferred_output[0].role must be 'assistant', got 'user'",
    ),
    (
        pair(non_preferred_output=PAIRS[0]["preferred_output"]),
        "'preferred_output' and 'non_preferred_output' are the same",
    ),
    (
        pair(preferred_output=[{"role": "assistant", "content": {"text": "Hi"}}]),
        "preferred_output[0].content must be a string, got an object",
    ),
    (
        pair(input={"messages": [USER], "tools": [{"type": "function", "function": {}}]}),
        "input.tools must be empty or left out: loraforge does not train tool calls",
    ),
    (pair(input={"messages": []}), "'input.messages' must be a non-empty array of messages"),
    (pair(input="Hello"), "'input' must be an object"),
]


@pytest.mark.parametrize(("record", "message"), BAD_LINES)
def test_a_bad_preference_line_is_refused_at_upload_with_its_line_and_nothing_is_stored(
    client: openai.OpenAI, services: Services, record: dict[str, Any], message: str
) -> None:
    before = counts(services)
    error = refused(upload, client=client, records=[PAIRS[0], record, PAIRS[1]], name="p.jsonl")
    assert (error["code"], error["param"]) == ("invalid_example", "file")
    assert error["message"].startswith("p.jsonl: line 2: ")
    assert message in error["message"]
    assert counts(services) == before
    assert services.store.list_keys("tenants/") == []


# --- refused in validation, when the format is only known then --------------------------------


def unrecorded_format_file(services: Services, tenant_id: str, records: list[Any]) -> str:
    """A file whose row records no format (as rows from before formats were recorded)."""
    data = jsonl(records)
    return store_file(
        services, tenant_id, data, format=None, examples=None, tokens=None, filename="old.jsonl"
    )


@pytest.mark.parametrize(
    ("records", "method", "message"),
    [
        (PAIRS, None, 'holds preference pairs, which only DPO trains on: pass method={"type"'),
        (CHAT, {"type": "dpo"}, "is in the 'chat' format; a DPO job (method type 'dpo') trains"),
    ],
)
def test_a_file_of_the_wrong_format_fails_the_job_in_validation_when_only_then_known(
    client: openai.OpenAI,
    services: Services,
    tenant_a: TenantKeys,
    base_name: str,
    records: list[dict[str, Any]],
    method: dict[str, Any] | None,
    message: str,
) -> None:
    file_id = unrecorded_format_file(services, tenant_a.tenant_id, records)
    extra: dict[str, Any] = {} if method is None else {"method": method}
    job = client.fine_tuning.jobs.create(model=base_name, training_file=file_id, **extra)
    failed = wait_for(client, job.id, {"queued", "failed"})
    assert failed.status == "failed"
    assert failed.error is not None
    assert (failed.error.code, failed.error.param) == ("invalid_file_format", "training_file")
    assert failed.error.message.startswith(f"training_file: file {file_id} (old.jsonl) ")
    assert message in failed.error.message


# --- the dashboard's new-job form -------------------------------------------------------------


@pytest.fixture
def signed_in(app: Any, tenant_a: TenantKeys) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as browser:
        form = browser.get("/sign-in").text
        signin = re.search(r'name="signin" value="([^"]+)"', form)
        assert signin is not None
        browser.post("/sign-in", data={"api_key": tenant_a.member, "signin": signin.group(1)})
        yield browser


def csrf_token(browser: TestClient) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/jobs/new").text)
    assert found is not None
    return found.group(1)


def test_the_new_job_form_offers_the_method_and_starts_a_dpo_job_with_its_beta(
    signed_in: TestClient,
    client: openai.OpenAI,
    services: Services,
    tenant_a: TenantKeys,
    base_name: str,
) -> None:
    page = signed_in.get("/jobs/new").text
    assert 'value="dpo"' in page and 'data-field="dpo_beta"' in page
    prefs = upload(client, PAIRS, "prefs.jsonl")
    form = {"csrf_token": csrf_token(signed_in), "model": base_name, "training_file": prefs.id}
    answer = signed_in.post(
        "/jobs/new", data={**form, "method": "dpo", "dpo_beta": "0.3"}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    job_id = answer.headers["location"].removeprefix("/jobs/")
    stored = stored_hyperparameters(services, tenant_a.tenant_id, job_id)
    assert (stored["method"], stored["dpo_beta"]) == ("dpo", 0.3)

    # supervised on a preference file: the API's refusal, on the page; the hidden beta not sent
    answer = signed_in.post("/jobs/new", data={**form, "method": "supervised", "dpo_beta": "0.3"})
    assert answer.status_code == 400
    assert "holds preference pairs, which only DPO trains on" in answer.text
