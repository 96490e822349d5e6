"""The session's databases are written down by each process of the run as they are made, and
dropped by a process of its own once the run ends (`tests/conftest.py`): its output goes
nowhere, so bookkeeping or a dropper that broke would leave every run's databases behind
without a word."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import _DROP_LATER, _create_database, _with_database, _write_down


def _exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return found is not None


def test_the_dropper_drops_every_database_named_and_only_those(pg_admin_url: str) -> None:
    # Written down too: what this leaves is dropped at the session's end.
    names = [_create_database(pg_admin_url, "lf_dropper") for _ in range(2)]
    kept = _create_database(pg_admin_url, "lf_dropper")
    # One of them still in use, as a session's last pooled connection may be.
    with psycopg.connect(_with_database(pg_admin_url, names[0])):
        dropped = subprocess.run(
            [sys.executable, "-c", _DROP_LATER, pg_admin_url, "2"],
            input="\n".join(names),
            text=True,
            capture_output=True,
            timeout=120,
        )
    assert dropped.returncode == 0, dropped.stderr
    assert [_exists(pg_admin_url, name) for name in names] == [False, False]
    assert _exists(pg_admin_url, kept)


PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

NESTED_TEST = """
import os
from pathlib import Path


def _write(database_url, template_database, broker_url):
    names = [database_url.rsplit("/", 1)[1], template_database, broker_url.rsplit("/", 1)[1]]
    (Path(os.environ["NESTED_OUT"]) / names[0]).write_text(" ".join(names))


def test_one(database_url, template_database, broker_url):
    _write(database_url, template_database, broker_url)


def test_two(database_url, template_database, broker_url):
    _write(database_url, template_database, broker_url)
"""


@pytest.mark.slow
def test_each_worker_of_a_run_writes_down_every_database_it_makes(
    pg_admin_url: str, tmp_path: Path
) -> None:
    """A run of its own on two workers, each making a test database, a template and a broker's
    database: the run's record holds each of them, by server, and nothing else. (Here the
    record is this test's, so the run does not drop them: this session does, at its end.)"""
    (tmp_path / "test_nested.py").write_text(NESTED_TEST)
    out, record = tmp_path / "made", tmp_path / "record"
    out.mkdir()
    record.mkdir()
    env = dict(os.environ)
    env.update(
        LORAFORGE_TEST_DATABASE_URL=pg_admin_url,
        LORAFORGE_TEST_MADE_DATABASES=str(record),
        NESTED_OUT=str(out),
    )
    ran = subprocess.run(
        [*PYTEST, "-n", "2", "-p", "tests.conftest", str(tmp_path / "test_nested.py")],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    written = [
        line.split("\t") for f in record.glob("*.made") for line in f.read_text().split("\n")
    ]
    written = [entry for entry in written if entry != [""]]
    for url, name in written:  # this session drops them at its end, as it drops its own
        _write_down(url, name)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    made = {name for f in out.iterdir() for name in f.read_text().split()}
    assert len(list(out.iterdir())) == 2 and len(made) >= 4
    assert sorted(name for _, name in written) == sorted(made)
    assert {url for url, _ in written} == {pg_admin_url}
    assert all(_exists(pg_admin_url, name) for name in made)
