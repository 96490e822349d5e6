"""A NUL character (U+0000) anywhere a request carries text: refused with 400 naming where,
before anything is read or written (PostgreSQL's text and JSONB cannot hold one; each of
these was an internal error, found by fuzzing the OpenAPI schema with schemathesis)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.integration.test_api import CHAT, counts, jsonl, objects, upload

# (method, path, request arguments, the param the refusal names): %00 is the NUL in an address.
# "F" stands for an uploaded training file's id, "B" for the base's name.
REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("GET", "/v1/fine_tuning/jobs?after=ftjob-%00", {}, "after"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00", {}, "job_id"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00/events", {}, "job_id"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-%00/cancel", {}, "job_id"),
    ("GET", "/v1/files?after=file-%00", {}, "after"),
    ("GET", "/v1/files/file-%00", {}, "file_id"),
    ("DELETE", "/v1/files/file-%00", {}, "file_id"),
    ("GET", "/v1/adapters?after=a%00", {}, "after"),
    ("GET", "/v1/base_models/tiny%00", {}, "name"),
    ("GET", "/v1/fine_tuning/jobs?limit=5&tag%00=1", {}, "tag\\x00"),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "B\x00", "training_file": "F"}}, "model"),
    (
        "POST",
        "/v1/fine_tuning/jobs",
        {"json": {"model": "B", "training_file": "F", "metadata": {"team": "a\x00"}}},
        "metadata.team",
    ),
    ("POST", "/v1/api_keys", {"json": {"name": "ci\x00", "role": "member"}}, "name"),
]


def _fill(value: Any, file_id: str, base: str) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, file_id, base) for k, v in value.items()}
    return {"F": file_id, "B": base, "B\x00": base + "\x00"}.get(value, value)


@pytest.mark.parametrize(("method", "path", "kwargs", "param"), REFUSED)
def test_a_nul_anywhere_in_a_request_is_refused_naming_where(
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base_name: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    param: str,
) -> None:
    file_id = upload(client, tenant_a, jsonl(CHAT)).json()["id"]
    kwargs = _fill(kwargs, file_id, base_name)
    before = counts(services)
    response = client.request(method, path, headers=tenant_a.headers(), **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_text", param)
    assert "NUL character" in error["message"] and param in error["message"]
    assert counts(services) == before


def test_an_escaped_backslash_before_u0000_is_text_not_a_nul(
    client: TestClient, tenant_a: TenantKeys
) -> None:
    # JSON's "\\u0000" is a backslash and "u0000": six characters that PostgreSQL stores.
    response = client.post(
        "/v1/api_keys",
        headers={**tenant_a.headers(), "Content-Type": "application/json"},
        content=b'{"name": "ci\\\\u0000", "role": "member"}',
    )
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "ci\\u0000"


def test_an_upload_whose_file_name_holds_a_nul_stores_nothing(
    client: TestClient, services: Services, tenant_a: TenantKeys
) -> None:
    # Written by hand: an HTTP client escapes a NUL in a file name (httpx sends "%00").
    boundary = "loraforge-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="train\x00.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + jsonl(CHAT)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    before = counts(services)
    response = client.post(
        "/v1/files",
        headers={
            **tenant_a.headers(),
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
        content=body,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_text", "file")
    assert "file name of form field 'file'" in error["message"]
    assert counts(services) == before
    assert objects(services) == []


@pytest.mark.parametrize(
    ("method", "path", "data", "where"),
    [
        ("GET", "/jobs/ftjob-%00", None, "path parameter &#39;job_id&#39;"),
        ("GET", "/jobs?after=%00", None, "query parameter &#39;after&#39;"),
        ("POST", "/sign-in", {"api_key": "lf-\x00", "signin": "x"}, "form field &#39;api_key&#39;"),
    ],
)
def test_a_page_refuses_a_nul_on_a_page(
    client: TestClient, method: str, path: str, data: dict[str, str] | None, where: str
) -> None:
    response = client.request(method, path, data=data, follow_redirects=False)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert where in response.text and "NUL character" in response.text
