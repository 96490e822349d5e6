"""Shared fixtures: a real PostgreSQL, one database per test cloned from a migrated template.

The server is `LORAFORGE_TEST_DATABASE_URL` when set, else the machine's server on
127.0.0.1:5432 when one answers, else an embedded one started through `pgserver`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from control_plane import db
from tests.faults.tcp_proxy import CuttableProxy

pytest_plugins = [
    "tests.s3_server",
    "tests.api_harness",
    "tests.peft_adapter",
    "tests.tinker_harness",
]

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
# The session's databases dropped this many at a time at its end.
DROPPING_AT_ONCE = 8


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


# The servers this session started itself: their databases go with their data directories.
_EMBEDDED: set[str] = set()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """libpq URL of a maintenance database on a real PostgreSQL server."""
    url = os.environ.get("LORAFORGE_TEST_DATABASE_URL")
    if url:
        yield db.libpq_url(url)
        return
    if _reachable(LOCAL_SERVER):
        yield LOCAL_SERVER
        return
    import pgserver

    with tempfile.TemporaryDirectory(prefix="loraforge-pg-") as data_dir:
        server = pgserver.get_server(Path(data_dir), cleanup_mode="stop")
        embedded = db.libpq_url(str(server.get_uri()))
        _EMBEDDED.add(embedded)
        yield embedded
        server.cleanup()


def _with_database(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _admin_execute(admin_url: str, sql: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


# Run by a process of its own once the session ends: drops the databases named on stdin.
_DROP_LATER = """
import sys
from concurrent.futures import ThreadPoolExecutor
import psycopg

def drop(name):
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

with ThreadPoolExecutor(max_workers=int(sys.argv[2])) as pool:
    list(pool.map(drop, sys.stdin.read().split()))
"""


def _drop_later(admin_url: str, names: list[str]) -> None:
    """Hand the databases to a process of its own that drops them after this one has gone."""
    dropper = subprocess.Popen(
        [sys.executable, "-c", _DROP_LATER, admin_url, str(DROPPING_AT_ONCE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    assert dropper.stdin is not None
    dropper.stdin.write("\n".join(reversed(names)))
    dropper.stdin.close()


# The workers' databases, by server, as each worker reports them (the xdist controller's).
_WORKERS_DATABASES: dict[str, list[str]] = {}


@pytest.fixture(scope="session")
def made_databases(pg_admin_url: str, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Databases this session created, dropped together once it ends.

    Each DROP DATABASE waits for a checkpoint: dropping after every test would make the
    suite's time depend on the disk's flush latency, and dropping the session's 700 or so at
    its end took 16 to 34 s of it. So they are handed, by name, to a process of its own that
    outlives the session and drops them, several at a time (drops that ask at once share one
    checkpoint); its output goes nowhere. A test worker of pytest-xdist reports its names to
    the controller, which hands every worker's over once all have finished, so no drop's
    checkpoint slows the tests a worker still runs. An embedded server's databases go with its
    data directory, so none is dropped there.
    """
    names: list[str] = []
    yield names
    if not names or pg_admin_url in _EMBEDDED:
        return
    if hasattr(request.config, "workerinput"):
        request.config.workeroutput["made_databases"] = [pg_admin_url, names]  # type: ignore[attr-defined]
    else:
        _drop_later(pg_admin_url, names)


def pytest_testnodedown(node: Any, error: object) -> None:
    """A worker finished: keep the databases it made for the session's end."""
    made = getattr(node, "workeroutput", {}).get("made_databases")
    if made:
        admin_url, names = made
        _WORKERS_DATABASES.setdefault(admin_url, []).extend(names)


def pytest_sessionfinish(session: pytest.Session) -> None:
    for admin_url, names in _WORKERS_DATABASES.items():
        _drop_later(admin_url, names)


def _create_database(
    admin_url: str, made: list[str], prefix: str, template: str | None = None
) -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    clause = f' TEMPLATE "{template}"' if template else ""
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"{clause}')
    made.append(name)
    return name


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str, made_databases: list[str]) -> str:
    """A database migrated to head once per session; tests clone it."""
    name = _create_database(pg_admin_url, made_databases, "lf_template")
    db.upgrade(_with_database(pg_admin_url, name))
    return name


@pytest.fixture
def empty_database_url(pg_admin_url: str, made_databases: list[str]) -> str:
    """A fresh, empty database (for migration tests)."""
    name = _create_database(pg_admin_url, made_databases, "lf_empty")
    return db.normalize_url(_with_database(pg_admin_url, name))


@pytest.fixture
def database_url(pg_admin_url: str, template_database: str, made_databases: list[str]) -> str:
    """SQLAlchemy URL of this test's own database, at the migration head."""
    name = _create_database(pg_admin_url, made_databases, "lf_test", template_database)
    return db.normalize_url(_with_database(pg_admin_url, name))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = db.make_engine(database_url, pool_size=12)
    yield eng
    eng.dispose()


@pytest.fixture
def proxy(database_url: str) -> Iterator[CuttableProxy]:
    """A TCP proxy in front of the test's database that the test can cut (a database outage as
    a client sees one) and restore."""
    url = make_url(database_url)
    p = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    yield p
    p.close()


@pytest.fixture
def proxied_url(database_url: str, proxy: CuttableProxy) -> str:
    """The test's database URL, through `proxy`."""
    return (
        make_url(database_url)
        .set(host="127.0.0.1", port=proxy.port)
        .render_as_string(hide_password=False)
    )


# The heavier tiers, heaviest first (pyproject's markers).
_HEAVY_FIRST = ("realmodel", "faults", "ray", "slow")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a heavier tier's test run first, each module's tests together and in
    their own order.

    The test command runs the suite on two workers (pytest-xdist's `worksteal`: each takes
    half the list in order, and one that runs out takes from the other's tail). With the long
    tests first, the last minutes are short tests on both workers rather than one worker
    finishing a 100-second training job alone, and the heavy tests run mostly beside light ones,
    not beside each other. Keeping a module together keeps its module-scoped fixtures (a loaded
    base, a reference run) set up once.
    """
    rank: dict[str, int] = {}
    for item in items:
        tier = next(
            (i for i, name in enumerate(_HEAVY_FIRST) if item.get_closest_marker(name)),
            len(_HEAVY_FIRST),
        )
        rank[item.nodeid.split("::")[0]] = min(rank.get(item.nodeid.split("::")[0], tier), tier)
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank[item.nodeid.split("::")[0]], order[id(item)]))


def pytest_configure(config: pytest.Config) -> None:
    """What the first use of a tool makes, unlocked, made once before any test worker starts
    (the controller's, or the only process's): two workers making it at once would race."""
    if hasattr(config, "workerinput"):
        return
    if os.geteuid() == 0:
        # pgserver run as root runs its servers as a system user it adds with `useradd` on
        # first use; a second `useradd` of the same user fails, and that worker's session.
        from pgserver.utils import ensure_user_exists

        ensure_user_exists("pgserver")
    if not (Path.home() / ".ray" / "auth_token").is_file():
        # Ray's first local cluster writes ~/.ray/auth_token: two clusters started at once
        # could each keep a token of their own while the file holds the other's.
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )

        generate_and_save_token()
