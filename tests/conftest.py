"""Shared fixtures: a real PostgreSQL, one database per test cloned from a migrated template.

The server is `LORAFORGE_TEST_DATABASE_URL` when set, else the machine's server on
127.0.0.1:5432 when one answers, else an embedded one started through `pgserver`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


# Where every process of this run (the workers of pytest-xdist, or the one process) writes the
# name of each database it makes, a file each: set by the run's first process before any worker
# starts, which the workers inherit.
_MADE_DIR = "LORAFORGE_TEST_MADE_DATABASES"
_OWN_MADE_DIR: list[Path] = []  # the directory, where this process made it


def _create_database(admin_url: str, prefix: str, template: str | None = None) -> str:
    """Create a database for this session; the run drops its databases together once it ends.

    Each DROP DATABASE waits for a checkpoint: dropping after every test would make the
    suite's time depend on the disk's flush latency, and dropping the session's 700 or so at
    its end took 16 to 34 s of it. So each is written down here as it is made,
    and once the run ends (the controller's end, after every worker's; on Ctrl-C too, and for
    a worker that crashed) the names go to a process of its own that outlives the run and
    drops them, several at a time (drops that ask at once share one checkpoint); its output
    goes nowhere. An embedded server's databases go with its data directory, so none is
    written down there.
    """
    name = f"{prefix}_{secrets.token_hex(6)}"
    clause = f' TEMPLATE "{template}"' if template else ""
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"{clause}')
    if admin_url not in _EMBEDDED:
        _write_down(admin_url, name)
    return name


def _write_down(admin_url: str, name: str) -> None:
    """Add a database to the run's record, for the run's end to drop."""
    record = os.environ.get(_MADE_DIR)
    if record:
        with (Path(record) / f"{os.getpid()}.made").open("a") as names:
            names.write(f"{admin_url}\t{name}\n")


@pytest.hookimpl(trylast=True)  # after the session's fixtures and the workers are torn down
def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _OWN_MADE_DIR:
        return
    made: dict[str, list[str]] = {}
    for record in sorted(_OWN_MADE_DIR[0].glob("*.made")):
        for line in record.read_text().splitlines():
            admin_url, name = line.split("\t")
            made.setdefault(admin_url, []).append(name)
    for admin_url, names in made.items():
        _drop_later(admin_url, names)
    shutil.rmtree(_OWN_MADE_DIR[0], ignore_errors=True)


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> str:
    """A database migrated to head once per session; tests clone it."""
    name = _create_database(pg_admin_url, "lf_template")
    db.upgrade(_with_database(pg_admin_url, name))
    return name


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> str:
    """A fresh, empty database (for migration tests)."""
    name = _create_database(pg_admin_url, "lf_empty")
    return db.normalize_url(_with_database(pg_admin_url, name))


@pytest.fixture
def database_url(pg_admin_url: str, template_database: str) -> str:
    """SQLAlchemy URL of this test's own database, at the migration head."""
    name = _create_database(pg_admin_url, "lf_test", template_database)
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
    """Under pytest-xdist, modules holding a heavier tier's test run first, each module's tests
    together and in their own order.

    `bash scripts/test.sh` runs the suite on two workers (where the machine has two CPUs)
    (pytest-xdist's `worksteal`: each takes half the list in order, and one that runs out takes
    from the other's tail). With the long tests first, the last minutes are short tests on both
    workers rather than one worker finishing a 100-second training job alone, and the heavy
    tests run mostly beside light ones, not beside each other. Keeping a module together keeps
    its module-scoped fixtures (a loaded base, a reference run) set up once, mostly.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return  # in one process, the suite's own order
    rank: dict[Path, int] = {}
    for item in items:
        tier = next(
            (i for i, name in enumerate(_HEAVY_FIRST) if item.get_closest_marker(name)),
            len(_HEAVY_FIRST),
        )
        rank[item.path] = min(rank.get(item.path, tier), tier)
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank[item.path], order[id(item)]))


def pytest_configure(config: pytest.Config) -> None:
    """What the first use of a tool makes, unlocked, made once before any test worker starts
    (the controller's, or the only process's): two workers making it at once would race."""
    if hasattr(config, "workerinput"):
        return
    if not os.environ.get(_MADE_DIR):
        _OWN_MADE_DIR.append(Path(tempfile.mkdtemp(prefix="loraforge-made-databases-")))
        os.environ[_MADE_DIR] = str(_OWN_MADE_DIR[0])
    if os.geteuid() == 0:
        # pgserver run as root (the embedded platform of the fault tests, or the tests' server
        # where none answers) runs its servers as a system user it adds with `useradd` on first
        # use; a second `useradd` of the same user at once fails. Where this one fails, pgserver
        # fails as it would have, in the tests that use it.
        from pgserver.utils import ensure_user_exists

        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            ensure_user_exists("pgserver")
    if not (Path.home() / ".ray" / "auth_token").is_file():
        # Ray's first local cluster writes ~/.ray/auth_token: two clusters started at once
        # could each keep a token of their own while the file holds the other's.
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )

        generate_and_save_token()
