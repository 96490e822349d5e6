"""The Sessions list's names, statuses and search in a real browser: each session shows the
display name its SDK gave it and its status (active, finished as its client said with the
client's detail on the badge, or ended), on the list and on its own page; the search form finds
sessions by words of a name (any case, any order) or an exact id, by status and by metadata
pairs, exactly the tenant's matching sessions newest first, a page at a time with the filter in
every link, and never another tenant's; and what no search can take is a 400 page saying why.

Sessions are made by the product's own functions (`create_session`, `finish_session`), their
times then set in SQL; what each search should list is worked out here in plain Python from the
rows the database holds."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, Response, expect
from sqlalchemy import Connection, text

from control_plane.dashboard.routes.interactive import SESSIONS_PAGE
from control_plane.interactive_sessions import FinishReason, create_session, finish_session
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in

pytestmark = pytest.mark.browser


def open_session(
    conn: Connection,
    tenant_id: str,
    name: str | None = None,
    *,
    metadata: dict[str, str] | None = None,
    created: datetime | None = None,
    silent: bool = False,
    finish: tuple[FinishReason, str | None] | None = None,
) -> str:
    """A session as the SDK opens it (and, with `finish`, closes it: reason and detail);
    `created` sets its creation time, `silent` puts its last heartbeat ten minutes back."""
    session_id = create_session(
        conn,
        tenant_id,
        tags=[],
        user_metadata=metadata or {},
        sdk_version="0.38",
        display_name=name,
    )
    if finish is not None:
        finish_session(conn, tenant_id, session_id, *finish)
    conn.execute(
        text(
            "UPDATE interactive_sessions SET created_at = coalesce(:created, created_at), "
            "last_heartbeat_at = now() - CASE WHEN :silent THEN interval '10 minutes' "
            "ELSE interval '0' END WHERE id = :id"
        ),
        {"created": created, "silent": silent, "id": session_id},
    )
    return session_id


@dataclass(frozen=True)
class Held:
    """A session as the database holds it, with its status worked out here."""

    id: str
    created_at: datetime
    name: str | None
    metadata: dict[str, Any]
    status: str  # active | ended | finished: <reason>


def held(services: Services, tenant_id: str) -> list[Held]:
    """The tenant's sessions, newest first (ties by id, descending)."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, created_at, display_name, user_metadata, finish_reason, "
                "finished_at IS NOT NULL AS finished, "
                "last_heartbeat_at > now() - interval '2 minutes' AS heard "
                "FROM interactive_sessions WHERE tenant_id = :t ORDER BY created_at DESC, id DESC"
            ),
            {"t": tenant_id},
        ).all()
    return [
        Held(
            r.id,
            r.created_at,
            r.display_name,
            r.user_metadata,
            f"finished: {r.finish_reason}" if r.finished else ("active" if r.heard else "ended"),
        )
        for r in rows
    ]


def named(words: str) -> Callable[[Held], bool]:
    """A session matched by `words`: its id, or every word somewhere in its name, any case."""
    return lambda s: (
        s.id == words or all(w.lower() in (s.name or "").lower() for w in words.split())
    )


def rows(page: Page) -> dict[str, list[str]]:
    """The list's rows by session id, in order, each its cells' text as shown."""
    found = page.locator("#sessions tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.session, "
        "...Array.from(r.cells).map(c => c.innerText.replace(/\\s+/g, ' ').trim())])"
    )
    return {row[0]: row[1:] for row in found}


def search(page: Page, q: str = "", status: str = "", meta: str = "") -> Response | None:
    """Fill the search form as a person does and send it; the answer to the page it loads."""
    page.fill("#session-q", q)
    page.select_option("#session-status-filter", status)
    page.fill("#session-meta", meta)
    with page.expect_navigation() as answered:
        page.click("#session-search button[type=submit]")
    return answered.value


def test_each_session_shows_its_name_and_status_on_the_list_and_its_own_page(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    tenant = tenant_a.tenant_id
    now = datetime.now().astimezone()
    with services.engine.begin() as conn:
        ids = {
            "active": open_session(conn, tenant, "Llama sweep", created=now),
            # Heard from a moment ago, but its client finished it: finished, not active.
            "errored": open_session(
                conn,
                tenant,
                "Diverging run",
                created=now - timedelta(seconds=1),
                finish=("errored", "diverged"),
            ),
            "success": open_session(
                conn, tenant, "Done", created=now - timedelta(seconds=2), finish=("success", None)
            ),
            "interrupted": open_session(
                conn,
                tenant,
                "Stopped",
                created=now - timedelta(seconds=3),
                silent=True,
                finish=("interrupted", "KeyboardInterrupt"),
            ),
            "ended": open_session(conn, tenant, created=now - timedelta(seconds=4), silent=True),
        }

    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    shown = rows(page)
    assert list(shown) == list(ids.values())
    assert {s: cells[3] for s, cells in shown.items()} == {
        ids["active"]: "active",
        ids["errored"]: "finished: errored",
        ids["success"]: "finished: success",
        ids["interrupted"]: "finished: interrupted",
        ids["ended"]: "ended",
    }
    # The name above the id, both shown; a session without one shows its id alone.
    assert shown[ids["errored"]][0] == f"Diverging run {ids['errored']}"
    assert shown[ids["ended"]][0] == ids["ended"]
    # The client's detail is the badge's tooltip.
    badge = page.locator(f"#sessions tr[data-session='{ids['errored']}'] .session-status")
    expect(badge).to_have_attribute("title", "diverged")
    unexplained = page.locator(f"#sessions tr[data-session='{ids['success']}'] .session-status")
    assert unexplained.get_attribute("title") is None

    page.click(f"#sessions a[href='/sessions/{ids['errored']}']")
    page.wait_for_url(f"{live_url}/sessions/{ids['errored']}")
    expect(page.locator("#session-name")).to_have_text("Diverging run")
    expect(page).to_have_title(re.compile("^Diverging run"))
    expect(page.locator(".page-head p")).to_contain_text(f"Session {ids['errored']}")
    expect(page.locator("#session-status")).to_have_text("finished: errored")
    expect(page.locator("#session-status")).to_have_attribute("title", "diverged")
    expect(page.locator("#session-finish-detail")).to_have_text("diverged")
    page.goto(f"{live_url}/sessions/{ids['active']}")
    expect(page.locator("#session-status")).to_have_text("active")
    expect(page.locator("#session-silent")).to_have_count(0)
    page.goto(f"{live_url}/sessions/{ids['ended']}")
    expect(page.locator("#session-name")).to_have_text(f"Session {ids['ended']}")
    expect(page.locator("#session-status")).to_have_text("ended")
    expect(page.locator("#session-silent")).to_contain_text("not heard from within 2 minutes")


@pytest.fixture
def many(services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys) -> list[Held]:
    """Sessions of tenant-a with names, metadata and statuses to search among (newest first),
    and tenant-b's twins of them, which no search of tenant-a's may find."""
    now = datetime.now().astimezone()
    specs: list[tuple[str | None, dict[str, str], dict[str, Any]]] = [
        ("Llama sweep lr=1e-4", {"team": "nlp", "run": "1"}, {}),
        ("llama SWEEP 2", {"team": "nlp", "run": "2"}, {"finish": ("errored", "diverged")}),
        ("Mistral sweep", {"team": "vision"}, {"finish": ("success", None)}),
        ("Llama eval", {"team": "nlp", "run": "1"}, {"silent": True}),
        ("sweeping llamas", {}, {"finish": ("interrupted", None), "silent": True}),
        (None, {"team": "nlp"}, {}),
        ("100%_done", {"team": "nlp"}, {"finish": ("errored", "nan loss"), "silent": True}),
    ]
    with services.engine.begin() as conn:
        for tenant in (tenant_b.tenant_id, tenant_a.tenant_id):
            for i, (name, metadata, how) in enumerate(specs):
                created = now - timedelta(seconds=i)
                open_session(conn, tenant, name, metadata=metadata, created=created, **how)
    return held(services, tenant_a.tenant_id)


def test_a_search_by_words_of_a_name_or_an_id_lists_exactly_its_matches_newest_first(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    many: list[Held],
) -> None:
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    theirs = held(services, tenant_b.tenant_id)
    for words in ("SWEEP llama", "llama", "sweep", "Eval", "%_", "nothing-like-it"):
        answered = search(page, q=words)
        assert answered is not None and answered.status == 200, words
        expected = [s.id for s in many if named(words)(s)]
        assert list(rows(page)) == expected, words
        assert parse_qs(urlsplit(page.url).query) == {"q": [words]}  # a shareable address
        expect(page.locator("#session-q")).to_have_value(words)
        if not expected:
            expect(page.locator("#sessions-empty")).to_contain_text("No sessions match")
    # Two words, neither alone: only names holding both, whatever their case.
    assert [s.name for s in many if named("SWEEP llama")(s)] == [
        "Llama sweep lr=1e-4",
        "llama SWEEP 2",
        "sweeping llamas",
    ]

    unnamed = next(s for s in many if s.name is None)
    search(page, q=unnamed.id)
    assert list(rows(page)) == [unnamed.id]
    page.goto(f"{live_url}/sessions?q={theirs[0].id}")  # another tenant's id: unknown here
    assert rows(page) == {}
    expect(page.locator("#sessions-empty")).to_contain_text("No sessions match")


def test_a_search_by_status_or_metadata_pairs_finds_the_tenants_sessions_holding_them(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, many: list[Held]
) -> None:
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    by_status: dict[str, Callable[[Held], bool]] = {
        "active": lambda s: s.status == "active",
        "finished": lambda s: s.status.startswith("finished"),
        "errored": lambda s: s.status == "finished: errored",
    }
    assert all(any(wanted(s) for s in many) for wanted in by_status.values())
    for status, wanted in by_status.items():
        search(page, status=status)
        shown = rows(page)
        assert list(shown) == [s.id for s in many if wanted(s)], status
        # Each found session's row says the status it was found by.
        assert {i: cells[3] for i, cells in shown.items()} == {
            s.id: s.status for s in many if wanted(s)
        }
        expect(page.locator("#session-status-filter")).to_have_value(status)

    for meta in ("team=nlp", "team=nlp run=1", "run=1   team=nlp", "team=robots"):
        search(page, meta=meta)
        pairs = dict(p.split("=", 1) for p in meta.split())
        expected = [s.id for s in many if pairs.items() <= s.metadata.items()]
        assert list(rows(page)) == expected, meta

    # Every filter at once: each must hold.
    search(page, q="llama", status="errored", meta="team=nlp")
    assert list(rows(page)) == [
        s.id
        for s in many
        if named("llama")(s) and s.status == "finished: errored" and s.metadata.get("team") == "nlp"
    ]
    assert len(rows(page)) == 1
    query = parse_qs(urlsplit(page.url).query)
    assert query == {"q": ["llama"], "status": ["errored"], "meta": ["team=nlp"]}


def test_paging_a_search_lists_each_match_once_in_order_with_the_filter_kept(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    """More matches than two pages, on three creation times only, so each page ends inside a
    run of sessions created at the same instant: the cursor's id breaks the tie."""
    instants = [datetime.now().astimezone() - timedelta(seconds=s) for s in range(3)]
    with services.engine.begin() as conn:
        for i in range(2 * SESSIONS_PAGE + 40):
            name = f"Shard {i:03d}" if i % 4 else f"Other {i:03d}"  # a quarter do not match
            open_session(conn, tenant_a.tenant_id, name, created=instants[i % 3])
            if i % 10 == 0:
                open_session(conn, tenant_b.tenant_id, name, created=instants[i % 3])
    expected = [s.id for s in held(services, tenant_a.tenant_id) if named("shard")(s)]
    assert 2 * SESSIONS_PAGE < len(expected) < 3 * SESSIONS_PAGE

    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    search(page, q="shard")
    pages = [list(rows(page))]
    while page.locator("#older-sessions").count():
        assert parse_qs(
            urlsplit(page.locator("#older-sessions").get_attribute("href") or "").query
        )["q"] == ["shard"]
        with page.expect_navigation():
            page.click("#older-sessions")
        pages.append(list(rows(page)))
        expect(page.locator("#session-q")).to_have_value("shard")
    assert [len(p) for p in pages] == [
        SESSIONS_PAGE,
        SESSIONS_PAGE,
        len(expected) - 2 * SESSIONS_PAGE,
    ]
    assert [i for p in pages for i in p] == expected
    created = {s.id: s.created_at for s in held(services, tenant_a.tenant_id)}
    for before, after in pairwise(pages):
        assert created[before[-1]] == created[after[0]]  # a page ended inside a tie

    with page.expect_navigation():
        page.click("#newest-sessions")
    assert list(rows(page)) == pages[0]
    expect(page.locator("#session-q")).to_have_value("shard")


def test_what_no_search_can_take_is_a_400_page_saying_why(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    with services.engine.begin() as conn:
        open_session(conn, tenant_a.tenant_id, "Llama", metadata={"team": "nlp"})
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/sessions")
    answered = search(page, meta="team")
    assert answered is not None and answered.status == 400
    expect(page.locator("#forbidden")).to_contain_text(
        "'team' is not metadata to search: write key=value pairs separated by spaces"
    )

    cursor = "before_created=2024-01-01T00:00:00%2B00:00"
    for query, said in [
        ("meta=team%3Dnlp+%3Dnlp", "'team=nlp =nlp' is not metadata to search"),
        ("status=cancelled", "'cancelled' is not a status to search"),
        ("q=" + "x" * 201, "A search is at most 200 characters"),
        (cursor, "does not continue a search"),  # its id left out
        ("before_created=yesterday&before_id=sess-1", "does not continue a search"),
        ("before_created=2024-01-01T00:00:00&before_id=sess-1", "with its UTC offset"),
    ]:
        response = page.goto(f"{live_url}/sessions?{query}")
        assert response is not None and response.status == 400, query
        expect(page.locator("#forbidden")).to_contain_text(said)
    # A cursor as the Older link writes it is taken (no session is older than it).
    response = page.goto(f"{live_url}/sessions?{cursor}&before_id=sess-zzz")
    assert response is not None and response.status == 200
    assert rows(page) == {}
