"""The API answers as its OpenAPI document says, for whatever requests that document admits.

schemathesis generates requests from /openapi.json for every operation (valid ones and ones
that break the schema), sends them to the app on a real PostgreSQL, and checks each answer:
never a 500, only documented status codes, the documented content type, headers and body
schema (errors included: OpenAI's envelope), invalid input refused with a 4xx, a 401 where
the key is left out or wrong, a 405 with an exact `Allow` for a method a path does not take.
Generated path parameters are, half the time, the names and ids of real things (a file, a
finished job, an adapter version with an alias, the base), so the 200 answers are checked
too, not only the 404s. Hypothesis runs derandomized: the same requests on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from control_plane import registry, tenants
from control_plane.records import BaseModelRecord
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.factories import SECRET, make_base, make_tenant
from tests.integration.test_registry import claim_job, publish

EXAMPLES_PER_OPERATION = 40
ADAPTER = "bot"
ALIAS = "prod"


@pytest.fixture
def base(services: Services) -> BaseModelRecord:
    return make_base(services.engine, "tiny-llama")


@pytest.fixture
def real_parameters(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    base: BaseModelRecord,
    peft_adapter: Path,
) -> dict[str, dict[str, list[Any]]]:
    """Path parameters that name real things of tenant-a, by the path they appear in: a
    published version (its job finished, so its event stream ends), its alias and files."""
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name=ADAPTER)
    version = publish(services, job, peft_adapter).version
    aliased = client.put(
        f"/v1/adapters/{ADAPTER}/aliases/{ALIAS}",
        json={"version": version.number},
        headers=tenant_a.headers(),
    )
    assert aliased.status_code == 200, aliased.text
    member_key = client.post(
        "/v1/api_keys", json={"name": "ci", "role": "member"}, headers=tenant_a.headers()
    ).json()["id"]
    files = [f["name"] for f in version.files]
    hook = client.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}, headers=tenant_a.headers()
    ).json()["id"]
    delivery = client.post(f"/v1/webhooks/{hook}/test", headers=tenant_a.headers()).json()["id"]
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions"}
    line["body"] = {"model": base.name, "prompt": "Hi"}
    upload = ("requests.jsonl", json.dumps(line).encode())
    batch_file = client.post(
        "/v1/files", files={"file": upload}, data={"purpose": "batch"}, headers=tenant_a.headers()
    ).json()["id"]
    batch = client.post(
        "/v1/batches",
        json={
            "input_file_id": batch_file,
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
        headers=tenant_a.headers(),
    ).json()["id"]
    fuzzed = make_tenant(services.engine, "fuzzed")
    with services.engine.begin() as conn:
        fuzzed_key = tenants.create_api_key(conn, SECRET, fuzzed.id, role="member")[0].id
    adapter = {
        "name": [ADAPTER],
        "ref": [str(version.number), "latest", ALIAS],
        "number": [version.number],
        "filename": files,
        "alias": [ALIAS],
    }
    return {
        "/v1/adapters/": adapter,
        "/v1/files/": {"file_id": [job.training_file_id, batch_file]},
        "/v1/batches/": {"batch_id": [batch]},
        "/v1/fine_tuning/jobs/": {"job_id": [job.id]},
        "/v1/base_models/": {"name": [base.name]},
        "/v1/models/": {"model_id": [base.name, version.model_id]},
        # Another key of the tenant's: revoking the one the requests carry would make every
        # later answer a 401.
        "/v1/api_keys/": {"key_id": [member_key]},
        # tenant-a's admin is a platform operator: a tenant of its own to administer, not
        # tenant-a (whose limits and keys the other operations' requests depend on).
        "/v1/tenants/": {"name": [fuzzed.name], "key_id": [fuzzed_key]},
        "/v1/webhooks/": {"webhook_id": [hook], "delivery_id": [delivery]},
    }


def _with_real_names(schema: Any, real_parameters: dict[str, dict[str, list[Any]]]) -> None:
    @schema.hook
    def flatmap_path_parameters(context: Any, generated: dict[str, Any] | None) -> Any:
        """Half the time, the generated path parameters with the real names and ids put in."""
        path = context.operation.path
        known = next((v for prefix, v in real_parameters.items() if path.startswith(prefix)), {})
        if not known or generated is None:
            return st.just(generated)
        real = st.fixed_dictionaries(
            {
                name: st.sampled_from(known[name]) if name in known else st.just(value)
                for name, value in generated.items()
            }
        )
        return st.one_of(st.just(generated), real)


@pytest.mark.slow
def test_every_operation_answers_as_its_schema_says(
    app: FastAPI, tenant_a: TenantKeys, real_parameters: dict[str, dict[str, list[Any]]]
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    _with_real_names(schema, real_parameters)

    @schema.auth()
    class TenantAdminKey:
        """tenant-a's admin key on every request, except those generated without a key."""

        def get(self, case: Any, context: Any) -> str:
            return tenant_a.admin

        def set(self, case: Any, key: str, context: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_as_documented(case: Any) -> None:
            # Schema-valid data refused is not a failure here: a name the registry's rules
            # refuse (an alias that looks like a version), a base that is not registered.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        answers_as_documented()


def _operations(app_schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in app_schema["paths"].items()
        for method, operation in item.items()
    ]


def test_the_schema_documents_its_key_and_its_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["apiKey"]["description"],
    }
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for method, path, operation in _operations(spec):
        where = f"{method} {path}"
        responses = operation["responses"]
        assert "422" not in responses, where  # this API answers a bad request with a 400
        parameters = {p["name"].lower() for p in operation.get("parameters", [])}
        assert "authorization" not in parameters, where  # the key is the security scheme
        for status, response in responses.items():
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == error_ref, where
        if path.startswith("/v1/"):
            assert operation["security"] == [{"apiKey": []}], where
            assert {"400", "401", "503"} <= responses.keys(), where
            assert "Retry-After" in responses["503"]["headers"], where
        if "{" in path:
            assert "404" in responses, where
        if method in {"POST", "PUT", "DELETE"} and path.startswith("/v1/"):
            assert "403" in responses, where
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    # Names carry the registry's rules; an upload's purpose says which it takes.
    put_alias = spec["paths"]["/v1/adapters/{name}/aliases/{alias}"]["put"]
    patterns = {p["name"]: p["schema"].get("pattern") for p in put_alias["parameters"]}
    assert patterns == {"name": registry.NAME_SHAPE, "alias": registry.ALIAS_SHAPE}
    upload = spec["components"]["schemas"]["Body_upload_file_v1_files_post"]
    assert upload["properties"]["purpose"]["enum"] == ["batch", "fine-tune"]


def test_a_reader_key_changes_nothing_through_any_write(
    client: TestClient, tenant_a: TenantKeys, real_parameters: dict[str, dict[str, list[Any]]]
) -> None:
    """Every POST, PUT and DELETE the schema lists, sent with a reader key and the names of
    real things, is a 403 (the schema documents one on each)."""
    spec = client.get("/openapi.json").json()
    writes = [(m, p) for m, p, _ in _operations(spec) if m in {"POST", "PUT", "DELETE"}]
    assert len(writes) >= 10
    for method, path in writes:
        url = path
        for prefix, known in real_parameters.items():
            if path.startswith(prefix):
                for name, values in known.items():
                    url = url.replace("{" + name + "}", str(values[0]))
        answer = client.request(method, url, json={}, headers=tenant_a.headers("reader"))
        assert answer.status_code == 403, (method, url, answer.text)
        assert answer.json()["error"]["code"] in {"read_only_key", "admin_required"}
    assert client.get(f"/v1/adapters/{ADAPTER}/aliases", headers=tenant_a.headers()).json()[
        "data"
    ], "an alias was deleted"
