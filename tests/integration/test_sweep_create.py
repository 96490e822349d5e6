"""Creating a sweep (`POST /v1/fine_tuning/sweeps`): a grid of jobs in one request, on a real
PostgreSQL with real validation. One job per point in the grid's order, each as a create would
make it and tagged with the sweep's name; a point that would be refused refuses them all and
writes nothing; the sweep's moves and the jobs list select it by its name."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from control_plane.services import Services
from loraforge import Client, LoraforgeError
from tests.api_harness import TenantKeys
from tests.integration.test_api import CHAT, counts, jsonl, upload, wait_for_status
from tests.integration.test_dpo_jobs import PAIRS

SWEEPS = "/v1/fine_tuning/sweeps"


def file_of(client: TestClient, keys: TenantKeys, records: list[dict[str, Any]] = CHAT) -> str:
    return str(upload(client, keys, jsonl(records)).json()["id"])


def test_a_grid_makes_one_job_per_point_in_order_each_tagged_with_the_sweep(
    client: TestClient, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    file_id = file_of(client, tenant_a)
    grid = {"learning_rate_multiplier": [0.5, 1.0, 2.0], "lora_rank": [8, 16]}
    job = {
        "model": base_name,
        "training_file": file_id,
        "hyperparameters": {"n_epochs": 2},
        "metadata": {"team": "nlp"},
        "adapter_name": "support-bot",
    }
    made = client.post(
        SWEEPS,
        headers=tenant_a.headers("member"),
        json={"name": "lr-rank", "job": job, "grid": grid},
    )
    assert made.status_code == 200, made.text
    sweep = made.json()
    assert (sweep["object"], sweep["name"], sweep["metadata"]) == (
        "fine_tuning.sweep",
        "lr-rank",
        {"sweep": "lr-rank"},
    )
    points = [
        (j["hyperparameters"]["learning_rate_multiplier"], j["hyperparameters"]["lora_rank"])
        for j in sweep["jobs"]
    ]
    assert points == list(itertools.product(*grid.values()))  # the first name varies slowest
    for made_job in sweep["jobs"]:
        assert made_job["hyperparameters"]["n_epochs"] == 2
        assert made_job["metadata"] == {"team": "nlp", "sweep": "lr-rank"}
        assert made_job["training_file"] == file_id and made_job["status"] == "validating_files"
    ids = [j["id"] for j in sweep["jobs"]]
    # Each job is validated and queued as a job created alone is.
    for job_id in ids:
        assert wait_for_status(client, tenant_a, job_id, {"queued"})["status"] == "queued"
    listed = client.get(
        "/v1/fine_tuning/jobs",
        params={"metadata[sweep]": "lr-rank", "limit": 20},
        headers=tenant_a.headers(),
    ).json()
    assert sorted(j["id"] for j in listed["data"]) == sorted(ids)
    # The same name again adds to the sweep, and its moves take every job of it.
    more = client.post(
        SWEEPS,
        headers=tenant_a.headers(),
        json={"name": "lr-rank", "job": job, "grid": {"learning_rate_multiplier": [4.0]}},
    )
    assert more.status_code == 200, more.text
    cancelled = client.post(
        "/v1/fine_tuning/jobs/cancel",
        headers=tenant_a.headers(),
        json={"metadata": {"sweep": "lr-rank"}},
    ).json()
    assert cancelled["cancelled"] + cancelled["cancelling"] == 7


def test_a_point_a_create_would_refuse_refuses_the_sweep_and_writes_nothing(
    client: TestClient, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    file_id = file_of(client, tenant_a)
    job = {"model": base_name, "training_file": file_id}
    cases = [
        (
            {"job": job, "grid": {"lora_rank": [8, 2000]}},
            "invalid_hyperparameters",
            "grid.lora_rank",
            "grid point 2 of 2 (lora_rank=2000)",
        ),
        (
            {
                "job": {**job, "serving_target": {"max_lora_rank": 16}},
                "grid": {"lora_rank": [8, 16, 64], "use_dora": [False]},
            },
            "unservable_adapter",
            "job.serving_target",
            "grid point 3 of 3 (lora_rank=64, use_dora=false)",
        ),
        (
            {"job": {**job, "training_file": "file-missing"}, "grid": {"seed": [1, 2]}},
            "file_not_found",
            "job.training_file",
            "grid point 1 of 2 (seed=1)",
        ),
        (
            {"job": job, "grid": {"target_modules": [["q_proj"], [1]]}},
            "invalid_hyperparameters",
            "grid.target_modules",
            "grid point 2 of 2",
        ),
        (
            {"job": job, "grid": {"early_stopping_patience": [0, 3]}},
            "invalid_hyperparameters",
            "grid.early_stopping_patience",
            "grid point 2 of 2",
        ),
    ]
    before = counts(services)
    for body, code, param, where in cases:
        refused = client.post(SWEEPS, headers=tenant_a.headers(), json={"name": "s", **body})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == (code, param), error
        assert where in error["message"] and "no job of the sweep was created" in error["message"]
    assert counts(services) == before


REFUSED_BODIES = [
    ({"grid": {}}, "grid"),
    ({"grid": {"colour": [1]}}, "grid"),
    ({"grid": {"method": ["dpo"]}}, "grid"),
    ({"grid": {"lora_rank": []}}, "grid"),
    ({"grid": {"lora_rank": [8, 8]}}, "grid"),
    ({"grid": {"seed": list(range(17))}}, "grid"),
    ({"grid": {"seed": list(range(16)), "lora_rank": [4, 8, 16, 32, 64]}}, "grid"),
    ({"grid": {"a": [1], "b": [1], "c": [1], "d": [1], "e": [1]}}, "grid"),
    ({"grid": {"lora_rank": [8, "8"]}}, "grid"),  # the same rank as the job would store it
    ({"grid": {"n_epochs": ["auto", 3]}}, "grid"),
    ({"grid": {"lora_rank": [8]}, "hyperparameters": {"lora_rank": 4}}, "grid"),
    ({"grid": {"seed": [1, 2]}, "seed": 3}, "grid"),
    (  # an "auto" in the method's block would have overridden every point
        {
            "grid": {"n_epochs": [1, 5]},
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": "auto"}},
            },
        },
        "grid",
    ),
    ({"grid": {"dpo_beta": [0.1, 0.2]}}, "grid.dpo_beta"),
    ({"grid": {"seed": [1]}, "metadata": {"sweep": "other"}}, "job.metadata.sweep"),
    ({"grid": {"seed": [1]}, "metadata": {f"k{i}": "v" for i in range(16)}}, "job.metadata"),
    ({"grid": {"seed": [1]}, "name": "not a name"}, "name"),
]


@pytest.mark.parametrize(("change", "param"), REFUSED_BODIES)
def test_a_grid_that_cannot_be_swept_is_refused_saying_why(
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base_name: str,
    change: dict[str, Any],
    param: str,
) -> None:
    job = {"model": base_name, "training_file": file_of(client, tenant_a)}
    name = change.pop("name", "s")
    grid = change.pop("grid")
    before = counts(services)
    refused = client.post(
        SWEEPS, headers=tenant_a.headers(), json={"name": name, "job": job | change, "grid": grid}
    )
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_request" and error["message"]
    assert error["param"] == param or error["param"].startswith(f"{param}."), error
    assert counts(services) == before


def test_the_sweeps_median_stopping_is_for_a_job_of_a_sweep(
    client: TestClient, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    job = {
        "model": base_name,
        "training_file": file_of(client, tenant_a),
        "hyperparameters": {
            "eval_every_steps": 5,
            "eval_fraction": 0.2,
            "sweep_median_stopping": 2,
        },
    }
    before = counts(services)
    alone = client.post("/v1/fine_tuning/jobs", headers=tenant_a.headers(), json=job)
    assert alone.status_code == 400, alone.text
    error = alone.json()["error"]
    assert error["param"] == "hyperparameters.sweep_median_stopping"
    assert "POST /v1/fine_tuning/sweeps" in error["message"]
    unwatched = {**job, "hyperparameters": {"sweep_median_stopping": 2}, "metadata": {"sweep": "s"}}
    refused = client.post("/v1/fine_tuning/jobs", headers=tenant_a.headers(), json=unwatched)
    assert (
        refused.status_code == 400
        and "set eval_every_steps too" in refused.json()["error"]["message"]
    )
    assert counts(services) == before
    tagged = client.post(
        "/v1/fine_tuning/jobs", headers=tenant_a.headers(), json={**job, "metadata": {"sweep": "s"}}
    )
    assert tagged.status_code == 200, tagged.text
    swept = client.post(
        SWEEPS, headers=tenant_a.headers(), json={"name": "s", "job": job, "grid": {"seed": [1, 2]}}
    )
    assert swept.status_code == 200, swept.text
    assert {j["hyperparameters"]["sweep_median_stopping"] for j in swept.json()["jobs"]} == {2}


def test_a_sweep_replays_under_its_key_and_refuses_another_request_under_it(
    client: TestClient, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    body = {
        "name": "again",
        "job": {"model": base_name, "training_file": file_of(client, tenant_a)},
        "grid": {"seed": [1, 2, 3]},
    }
    headers = {**tenant_a.headers(), "Idempotency-Key": "sweep-7"}
    first = client.post(SWEEPS, headers=headers, json=body)
    assert first.status_code == 200, first.text
    after_first = counts(services)
    second = client.post(SWEEPS, headers=headers, json=body)
    assert second.status_code == 200
    assert [j["id"] for j in second.json()["jobs"]] == [j["id"] for j in first.json()["jobs"]]
    assert counts(services) == after_first
    # Any other sweep under the key is refused, whatever its points have in common with the
    # first's: a changed value, one more point (its first three are the first sweep's), fewer.
    for grid in ({"seed": [1, 2, 4]}, {"seed": [1, 2, 3, 4]}, {"seed": [1]}):
        other = client.post(SWEEPS, headers=headers, json=body | {"grid": grid})
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert counts(services) == after_first
    # A single job's key is not a point's: one made under "batch:0" leaves a sweep under
    # "batch" free, and the sweep's key is still free for a single job.
    single = {"model": base_name, "training_file": body["job"]["training_file"]}
    for key in ("batch:0", "sweep-7"):
        alone = client.post(
            "/v1/fine_tuning/jobs",
            headers={**tenant_a.headers(), "Idempotency-Key": key},
            json=single,
        )
        assert alone.status_code == 200, alone.text
    batch = client.post(
        SWEEPS, headers={**tenant_a.headers(), "Idempotency-Key": "batch"}, json=body
    )
    assert batch.status_code == 200, batch.text


def test_who_may_sweep_and_at_what_priority(
    client: TestClient, services: Services, tenant_a: TenantKeys, base_name: str
) -> None:
    body = {
        "name": "urgent",
        "job": {"model": base_name, "training_file": file_of(client, tenant_a), "priority": 9},
        "grid": {"seed": [1, 2]},
    }
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_priority = 5 WHERE id = :t"), {"t": tenant_a.tenant_id}
        )
    before = counts(services)
    capped = client.post(SWEEPS, headers=tenant_a.headers(), json=body)
    assert capped.status_code == 403
    assert capped.json()["error"]["code"] == "priority_above_tenant_cap"
    reader = client.post(SWEEPS, headers=tenant_a.headers("reader"), json=body)
    assert reader.status_code == 403
    # A name the registry would refuse is said before the priority, for one job as for a
    # sweep (as the jobs route has always ordered them).
    badly_named = {**body["job"], "adapter_name": "bad name!"}
    for path, sent in (
        (SWEEPS, body | {"job": badly_named}),
        ("/v1/fine_tuning/jobs", badly_named),
    ):
        refused = client.post(path, headers=tenant_a.headers(), json=sent)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] in ("adapter_name", "job.adapter_name")
    assert counts(services) == before


def test_a_dpo_sweep_over_beta_through_the_sdk(
    live_url: str, client: TestClient, tenant_a: TenantKeys, base_name: str
) -> None:
    pairs = file_of(client, tenant_a, PAIRS)
    sdk = Client(live_url, tenant_a.member)
    sweep = sdk.create_sweep(
        "betas",
        {"dpo_beta": [0.05, 0.2]},
        model=base_name,
        training_file=pairs,
        method={"type": "dpo"},
    )
    assert [j["method"]["dpo"]["hyperparameters"]["beta"] for j in sweep["jobs"]] == [0.05, 0.2]
    assert {j["hyperparameters"]["method"] for j in sweep["jobs"]} == {"dpo"}
    with pytest.raises(LoraforgeError) as refused:  # a chat file cannot train DPO: none made
        sdk.create_sweep(
            "betas",
            {"dpo_beta": [0.05]},
            model=base_name,
            training_file=file_of(client, tenant_a),
            method={"type": "dpo"},
        )
    assert (refused.value.status, refused.value.code) == (400, "invalid_file_format")
    assert refused.value.param == "job.training_file"
    assert (
        len(sdk.request("GET", "/v1/fine_tuning/jobs", params={"metadata[sweep]": "betas"})["data"])
        == 2
    )
