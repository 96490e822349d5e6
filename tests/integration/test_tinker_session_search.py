"""A tenant finds its interactive sessions again, through the official `tinker` SDK's
`RestClient.search_sessions` against the API on a real socket: by words of the name the SDK gave
them, by id, by `user_metadata` and by status (the client's finish and its reason, or still
heartbeating), newest first with what their checkpoints hold; every page of a keyset cursor
exactly once, ties on the creation time included, equal to a plain-Python filter of the same
rows; another tenant's sessions never; projects and users refused saying why."""

from __future__ import annotations

import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import text
from tinker.types import (
    ActiveSessionStatusQuery,
    ClientFinishedSessionStatusQuery,
    SessionSearchRequest,
    UserSearchOwner,
)

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, tinker_settings

pytestmark = [
    pytest.mark.usefixtures("tinker_sdk_env"),
    pytest.mark.filterwarnings("ignore::tinker.ExperimentalWarning"),
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _rest(url: str, key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=url, api_key="tml-" + key)


def _search(rest: tinker.RestClient, **filters: Any) -> list[str]:
    """Every matching session's id, following the cursor page by page."""
    request = SessionSearchRequest(**filters)
    found: list[str] = []
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            page = rest.search_sessions(request).result(timeout=30)
        found.extend(s.session_id for s in page.sessions)
        if page.next_cursor is None:
            return found
        request = request.model_copy(update={"cursor": page.next_cursor})


def test_sessions_are_found_by_name_metadata_and_how_their_clients_ended_them(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, executor: str
) -> None:
    key = "tml-" + tenant_a.member

    def session(name: str, metadata: dict[str, str] | None = None) -> tinker.ServiceClient:
        service = tinker.ServiceClient(
            user_metadata=metadata, display_name=name, base_url=live_url, api_key=key
        )
        service.create_sampling_client(base_model=executor)
        return service

    sweep = session("Nightly RL sweep", {"team": "rl"})
    sweep.close("errored", "the loss diverged").result(timeout=60)
    with session("nightly eval"):
        pass
    open_one = session("ad hoc 100%_done", {"team": "infra"})
    training = open_one.create_lora_training_client(base_model=executor, rank=4).result(timeout=120)
    training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
    saved = training.save_weights_for_sampler("first").result(timeout=120)

    rest = _rest(live_url, tenant_a.reader)
    with services.engine.connect() as conn:
        ids = dict(
            conn.execute(
                text("SELECT display_name, id FROM interactive_sessions ORDER BY created_at")
            ).all()
        )
    sweep_id, eval_id, open_id = (
        ids["Nightly RL sweep"],
        ids["nightly eval"],
        ids["ad hoc 100%_done"],
    )

    # By name: each word anywhere, whatever its case; newest first.
    assert _search(rest, display_name="nightly") == [eval_id, sweep_id]
    assert _search(rest, display_name="NIGHTLY sweep") == [sweep_id]
    assert _search(rest, display_name="sweep eval") == []
    # % and _ are themselves, not patterns.
    assert _search(rest, display_name="%_") == [open_id]
    assert _search(rest, display_name="c 1") == [open_id]
    # By id, or a name: either matches.
    assert _search(rest, session_id=open_id, display_name="eval") == [open_id, eval_id]
    assert _search(rest, user_metadata={"team": "rl"}) == [sweep_id]
    # By how the client ended it, and whether it still heartbeats.
    errored = [ClientFinishedSessionStatusQuery(reasons=["errored"])]
    assert _search(rest, statuses=errored) == [sweep_id]
    assert _search(rest, statuses=[ClientFinishedSessionStatusQuery()]) == [eval_id, sweep_id]
    assert _search(rest, statuses=[ActiveSessionStatusQuery()]) == [open_id]
    both = [ActiveSessionStatusQuery(), ClientFinishedSessionStatusQuery(reasons=["success"])]
    assert _search(rest, statuses=both) == [open_id, eval_id]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = rest.search_sessions(SessionSearchRequest()).result(timeout=30)
    by_id = {s.session_id: s for s in page.sessions}
    assert list(by_id) == [open_id, eval_id, sweep_id]
    ended = by_id[sweep_id]
    assert ended.status is not None and ended.status.type == "client_finished"
    assert (ended.status.reason.type, ended.status.detail) == ("errored", "the loss diverged")
    assert by_id[eval_id].status.reason.type == "success"
    assert by_id[open_id].status.type == "active"
    assert (ended.display_name, ended.user_metadata, ended.owner) == (
        "Nightly RL sweep",
        {"team": "rl"},
        tenant_a.tenant_id,
    )
    # What each session's checkpoints hold.
    assert (by_id[open_id].checkpoints_count, by_id[sweep_id].checkpoints_count) == (1, 0)
    listed = rest.list_checkpoints(training.model_id).result(timeout=30).checkpoints
    assert by_id[open_id].checkpoint_storage_bytes == listed[0].size_bytes > 0
    assert listed[0].tinker_path == saved.path
    # The session's own page names it.
    assert rest.get_session(sweep_id).result(timeout=30).display_name == "Nightly RL sweep"

    # A finish is kept as it was first said.
    second = httpx.post(
        f"{live_url}/api/v1/sessions/{sweep_id}/finish",
        json={"reason": {"type": "success"}},
        headers={"X-API-Key": key},
    )
    assert second.status_code == 200
    assert _search(rest, statuses=errored) == [sweep_id]
    open_one.close("success").result(timeout=60)

    # Another tenant finds none of them; projects and users are refused, saying why.
    assert _search(_rest(live_url, tenant_b.member)) == []
    with pytest.raises(tinker.BadRequestError, match="no projects"):
        _search(rest, project_ids=["p1"])
    with pytest.raises(tinker.BadRequestError, match="no users"):
        _search(rest, owner=UserSearchOwner(owner_urns=["urn:user:1"]))


def test_every_page_of_a_search_once_ties_included_as_a_plain_filter_reads_them(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    headers = {"X-API-Key": "tml-" + tenant_a.member}
    for n in range(23):
        body: dict[str, Any] = {
            "tags": [],
            "user_metadata": {"parity": "even" if n % 2 == 0 else "odd"},
            "sdk_version": "0.38",
            "display_name": f"run {n}" if n % 3 else None,
        }
        answer = httpx.post(f"{live_url}/api/v1/create_session", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
    httpx.post(
        f"{live_url}/api/v1/create_session",
        json={"tags": [], "user_metadata": None, "sdk_version": "0.38", "display_name": "run 1"},
        headers={"X-API-Key": "tml-" + tenant_b.member},
    ).raise_for_status()
    with services.engine.begin() as conn:
        # Ties on the creation time: seven sessions made at the same instant.
        conn.execute(
            text(
                "UPDATE interactive_sessions SET created_at = '2026-01-01T00:00:00Z' "
                "WHERE id IN (SELECT id FROM interactive_sessions WHERE tenant_id = :t "
                "ORDER BY id LIMIT 7)"
            ),
            {"t": tenant_a.tenant_id},
        )
        rows = conn.execute(
            text(
                "SELECT id, created_at, display_name, user_metadata FROM interactive_sessions "
                "WHERE tenant_id = :t"
            ),
            {"t": tenant_a.tenant_id},
        ).all()
    newest_first = sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)

    def expected(keep: Any) -> list[str]:
        return [r.id for r in newest_first if keep(r)]

    rest = _rest(live_url, tenant_a.reader)
    for limit in (1, 4, 7, 50):
        assert _search(rest, limit=limit) == expected(lambda r: True)
        assert _search(rest, limit=limit, user_metadata={"parity": "odd"}) == expected(
            lambda r: r.user_metadata["parity"] == "odd"
        )
    assert _search(rest, display_name="run 1", limit=3) == expected(
        lambda r: r.display_name is not None and "run 1" in r.display_name
    )
    # A cursor is where the last page ended: its session is not read twice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = rest.search_sessions(SessionSearchRequest(limit=5)).result(timeout=30)
    assert first.next_cursor is not None
    assert first.next_cursor.last_session_id == first.sessions[-1].session_id
    assert isinstance(first.next_cursor.last_created_at, datetime)
    # A finish naming no reason closed normally; a long detail is kept to 10,000 characters
    # (refused, the session would stay unfinished and its models loaded).
    last = newest_first[0].id
    finished = httpx.post(
        f"{live_url}/api/v1/sessions/{last}/finish", json={"detail": "x" * 20_000}, headers=headers
    )
    assert finished.status_code == 200, finished.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = rest.search_sessions(SessionSearchRequest(session_id=last)).result(timeout=30)
    (summary,) = found.sessions
    assert summary.status is not None and summary.status.type == "client_finished"
    assert summary.status.reason.type == "success" and len(summary.status.detail or "") == 10_000

    # A bad request says what is wrong.
    refused = httpx.post(f"{live_url}/api/v1/sessions/search", json={"limit": 500}, headers=headers)
    assert refused.status_code == 400 and "limit" in refused.text
