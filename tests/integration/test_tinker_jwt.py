"""Tinker's JWT auth exchange (`POST /api/v1/auth/token`, `control_plane.api.tinker_jwt`), the
official `tinker` SDK against the API on a real socket and a real PostgreSQL: the SDK trades its
key for JWTs and runs its session on them, `whoami` names the key and its tenant, a client whose
only credential is `TINKER_CREDENTIAL_CMD` works; a JWT is its key (role included) and stops with
it, at once in this process and within the cache's bound in another; expired, forged and garbled
JWTs are refused with the challenge that has the SDK exchange again; with the setting off, the SDK
sends plain keys and JWTs are refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import tinker
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from tinker.lib._jwt_auth import _is_invalid_token

from control_plane import tenants
from control_plane.api import tinker_jwt
from control_plane.api.app import create_app
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

LIFETIME = 600
CACHE_SECONDS = 1.0


@pytest.fixture
def jwt_auth() -> bool:
    return True


@pytest.fixture
def settings(tmp_path: Path, jwt_auth: bool) -> Settings:
    return tinker_settings(tmp_path).model_copy(
        update={
            "tinker_jwt_auth": jwt_auth,
            "tinker_jwt_lifetime_seconds": LIFETIME,
            "auth_cache_seconds": CACHE_SECONDS,
        }
    )


@pytest.fixture
def app(services: Services) -> Iterator[FastAPI]:
    """The API, noting for each request its path and whether it came with a JWT or a key."""
    built = create_app(services)
    seen: list[tuple[str, str]] = []

    @built.middleware("http")
    async def note_credential(request: Any, call_next: Any) -> Any:
        sent = request.headers.get("x-api-key", "")
        seen.append((request.url.path, "jwt" if sent.startswith("eyJ") else "key"))
        return await call_next(request)

    built.state.seen = seen
    yield built


def _principal(services: Services, key: str) -> tenants.Principal:
    with services.engine.connect() as conn:
        principal = tenants.authenticate(conn, services.settings.secret_key, key)
    assert principal is not None
    return principal


def _exchange(url: str, credential: str) -> httpx.Response:
    return httpx.post(f"{url}/api/v1/auth/token", json={}, headers={"X-API-Key": credential})


def _token(url: str, key: str) -> str:
    answer = _exchange(url, "tml-" + key)
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["jwt"]
    return token


def _runs(url: str, credential: str) -> httpx.Response:
    return httpx.get(f"{url}/api/v1/training_runs", headers={"X-API-Key": credential})


def _assert_invalid_token(answer: httpx.Response, says: str) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert _is_invalid_token(answer)  # what has the SDK exchange again and replay
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_token")
    assert says.lower() in error["message"].lower()


def test_the_sdk_runs_its_session_on_jwts_and_whoami_names_the_key_and_its_tenant(
    services: Services,
    app: FastAPI,
    live_url: str,
    tenant_a: TenantKeys,
    executor: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    member = _principal(services, tenant_a.member)
    who = tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_a.member).whoami()
    answer = who.result(timeout=60)
    assert answer.user_urn == f"loraforge:key:{member.key_id}"
    assert answer.org_urn == "tml:organization:tenant-a"
    assert answer.email is None  # a tenant's key, not a person's

    app.state.seen.clear()
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)
        assert sampler.get_base_model() == executor
        session_id = service.holder.get_session_id()
        runs = service.create_rest_client().list_training_runs().result(timeout=60)
        assert runs.training_runs == []
    # The key went to the handshake and the exchange only; the session ran on JWTs.
    by_kind: dict[str, set[str]] = {"jwt": set(), "key": set()}
    for path, kind in app.state.seen:
        by_kind[kind].add(path)
    assert by_kind["key"] == {"/api/v1/client/config", "/api/v1/auth/token"}
    assert {
        "/api/v1/create_session",
        "/api/v1/create_sampling_session",
        "/api/v1/training_runs",
        f"/api/v1/sessions/{session_id}/finish",
    } <= by_kind["jwt"]

    # A client whose only credential is a command that prints one (no key, none stored).
    monkeypatch.setenv("TINKER_CREDENTIAL_CMD", f"echo tml-{tenant_a.reader}")
    by_command = tinker.RestClient(base_url=live_url).whoami().result(timeout=60)
    assert by_command.user_urn == f"loraforge:key:{_principal(services, tenant_a.reader).key_id}"


def test_a_jwt_is_its_key_until_the_key_is_revoked_here_at_once_elsewhere_within_the_cache_bound(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    member = _principal(services, tenant_a.member)
    token = _token(live_url, tenant_a.member)
    claims = jwt.decode(
        token,
        tinker_jwt.signing_key(services.settings.secret_key),
        algorithms=["HS256"],
        audience="loraforge-tinker",
        issuer="loraforge",
    )
    assert {k: claims[k] for k in ("sub", "org_id", "tenant_id", "key_id", "role", "email")} == {
        "sub": f"loraforge:key:{member.key_id}",
        "org_id": "tenant-a",
        "tenant_id": tenant_a.tenant_id,
        "key_id": member.key_id,
        "role": "member",
        "email": "",
    }
    assert claims["exp"] - claims["iat"] == LIFETIME
    again = jwt.decode(_token(live_url, tenant_a.member), options={"verify_signature": False})
    assert again["jti"] != claims["jti"]

    # The same principal as the key's, as the SDK sends it and as a bearer token.
    me = httpx.get(f"{live_url}/api/v1/auth/apikey/me", headers={"X-API-Key": token})
    assert me.status_code == 200, me.text
    assert me.json()["key_id"] == int(member.key_id.removeprefix("key-"), 16)
    assert "(member) of tenant tenant-a" in me.json()["note"]
    bearer = httpx.get(
        f"{live_url}/api/v1/training_runs", headers={"Authorization": f"Bearer {token}"}
    )
    assert bearer.status_code == 200, bearer.text
    # Nowhere but the Tinker API: on the REST API a token could make a key that outlives it.
    for method, path in (("GET", "/v1/files"), ("POST", "/v1/api_keys")):
        rest = httpx.request(
            method, f"{live_url}{path}", headers={"Authorization": f"Bearer {token}"}, json={}
        )
        assert (rest.status_code, rest.json()["error"]["code"]) == (401, "invalid_api_key")
        assert "Tinker API (/api/v1) only" in rest.json()["error"]["message"]

    # Another API process on the same database, its cache holding the JWT.
    other = TestClient(create_app(services))
    assert other.get("/api/v1/training_runs", headers={"X-API-Key": token}).status_code == 200
    assert _runs(live_url, token).status_code == 200  # cached here too

    # Its JWT revokes the key itself (`tinker auth logout`); the audit log names the key, as
    # for the key itself.
    revoked = httpx.delete(f"{live_url}/api/v1/auth/apikey/me", headers={"X-API-Key": token})
    assert revoked.status_code == 200, revoked.text
    with services.engine.connect() as conn:
        actor = conn.execute(
            text("SELECT details->'actor' FROM audit_events WHERE event = 'api_key_revoked'")
        ).scalar_one()
    assert (actor["key_id"], actor["role"]) == (member.key_id, "member")
    _assert_invalid_token(_runs(live_url, token), "revoked")
    refused = _exchange(live_url, "tml-" + tenant_a.member)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    deadline = time.monotonic() + CACHE_SECONDS + 2
    while other.get("/api/v1/training_runs", headers={"X-API-Key": token}).status_code == 200:
        assert time.monotonic() < deadline, "the other process took a revoked key's JWT"
        time.sleep(0.1)
    _assert_invalid_token(
        other.get("/api/v1/training_runs", headers={"X-API-Key": token}), "revoked"
    )


def test_expired_forged_and_garbled_jwts_are_invalid_tokens_and_a_wrong_key_is_as_before(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    member = _principal(services, tenant_a.member)
    secret = services.settings.secret_key
    now = int(time.time())
    expired = tinker_jwt.mint(secret, member, "tenant-a", LIFETIME, now=now - LIFETIME - 5)
    _assert_invalid_token(_runs(live_url, expired), "expired")
    forged = tinker_jwt.mint("another-platforms-secret", member, "tenant-a", LIFETIME)
    _assert_invalid_token(_runs(live_url, forged), "Signature verification failed")
    # Signed with the platform's raw secret, not the key derived from it.
    raw = jwt.decode(
        tinker_jwt.mint(secret, member, "t", LIFETIME), options={"verify_signature": False}
    )
    _assert_invalid_token(_runs(live_url, jwt.encode(raw, secret)), "Signature")
    _assert_invalid_token(_runs(live_url, jwt.encode(raw, None, algorithm="none")), "alg")
    other_audience = jwt.encode({**raw, "aud": "elsewhere"}, tinker_jwt.signing_key(secret))
    _assert_invalid_token(_runs(live_url, other_audience), "audience")
    _assert_invalid_token(_runs(live_url, "eyJhbGciOiJIUzI1NiJ9.garbage.x"), "invalid")
    # The same key's token, signed right and live, is taken: the refusals were the tokens' own.
    assert _runs(live_url, tinker_jwt.mint(secret, member, "tenant-a", LIFETIME)).is_success

    wrong_key = _runs(live_url, "tml-lf-not-a-key")
    assert (wrong_key.status_code, wrong_key.json()["error"]["code"]) == (401, "invalid_api_key")
    assert "invalid_token" not in wrong_key.headers.get("WWW-Authenticate", "")


def test_a_jwt_carries_its_keys_role_and_one_exchanged_for_a_jwt_ends_no_later(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    session = {"tags": [], "user_metadata": None, "sdk_version": "0.38"}
    for credential in ("tml-" + tenant_a.reader, _token(live_url, tenant_a.reader)):
        refused = httpx.post(
            f"{live_url}/api/v1/create_session", json=session, headers={"X-API-Key": credential}
        )
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "read_only_key")
        assert _runs(live_url, credential).status_code == 200
    written = httpx.post(
        f"{live_url}/api/v1/create_session",
        json=session,
        headers={"X-API-Key": _token(live_url, tenant_a.member)},
    )
    assert written.status_code == 200, written.text

    # The SDK exchanges whatever it was given, a JWT too: the new one ends no later.
    member = _principal(services, tenant_a.member)
    secret = services.settings.secret_key
    short = tinker_jwt.mint(secret, member, "tenant-a", LIFETIME, now=int(time.time()) - 500)
    renewed = _exchange(live_url, short)
    assert renewed.status_code == 200, renewed.text
    claims = [
        jwt.decode(t, options={"verify_signature": False}) for t in (short, renewed.json()["jwt"])
    ]
    assert claims[1]["exp"] == claims[0]["exp"] and claims[1]["jti"] != claims[0]["jti"]
    # The SDK given a JWT as its key runs on it.
    given = tinker.RestClient(base_url=live_url, api_key=short)
    assert given.list_training_runs().result(timeout=60).training_runs == []
    assert given.whoami().result(timeout=60).user_urn == f"loraforge:key:{member.key_id}"


@pytest.mark.parametrize("jwt_auth", [False])
def test_with_jwt_auth_off_the_sdk_sends_its_key_and_jwts_are_refused(
    services: Services,
    app: FastAPI,
    live_url: str,
    tenant_a: TenantKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "tml-" + tenant_a.member
    config = httpx.post(
        f"{live_url}/api/v1/client/config", json={"sdk_version": "0.38"}, headers={"X-API-Key": key}
    )
    assert config.json()["pjwt_auth_enabled"] is False
    off = _exchange(live_url, key)
    assert (off.status_code, off.json()["error"]["code"]) == (404, "jwt_auth_disabled")
    assert "LORAFORGE_TINKER_JWT_AUTH is off" in off.json()["error"]["message"]
    # A JWT minted while it was on, by the same secret.
    member = _principal(services, tenant_a.member)
    earlier = tinker_jwt.mint(services.settings.secret_key, member, "tenant-a", LIFETIME)
    refused = _runs(live_url, earlier)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_api_key")
    assert "LORAFORGE_TINKER_JWT_AUTH is off" in refused.json()["error"]["message"]

    app.state.seen.clear()
    with sdk_service(live_url, tenant_a.member) as service:
        rest = service.create_rest_client()
        assert rest.list_training_runs().result(timeout=60).training_runs == []
        with pytest.raises(RuntimeError, match="requires JWT auth"):
            rest.whoami().result(timeout=60)
    assert {kind for _, kind in app.state.seen} == {"key"}
    # A command's credential alone cannot reach a server that takes only keys, as the SDK says.
    monkeypatch.setenv("TINKER_CREDENTIAL_CMD", f"echo {key}")
    with pytest.raises(tinker.TinkerError, match="api_key client option must be set"):
        tinker.RestClient(base_url=live_url)


def test_tokens_minted_in_a_loop_take_one_cache_entry_their_keys(
    app: FastAPI, live_url: str, tenant_a: TenantKeys
) -> None:
    """The cache holds a token's key, not the token: any caller can mint tokens without end,
    and each new one must not cost a database lookup and an entry (10,000 of them would empty
    the cache for every tenant)."""
    cache = app.state.principals
    first = _token(live_url, tenant_a.member)
    assert _runs(live_url, first).status_code == 200
    entries = len(cache._entries)
    for _ in range(20):
        assert _runs(live_url, _token(live_url, tenant_a.member)).status_code == 200
    assert len(cache._entries) == entries
