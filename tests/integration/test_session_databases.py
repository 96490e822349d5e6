"""The session's databases are dropped by a process of its own once the session ends
(`tests/conftest.py`): its output goes nowhere, so a dropper that broke would leave every run's
databases behind without a word. This runs it as the session's end does."""

from __future__ import annotations

import subprocess
import sys

import psycopg

from tests.conftest import _DROP_LATER, _create_database, _with_database


def _exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return found is not None


def test_the_dropper_drops_every_database_named_and_only_those(pg_admin_url: str) -> None:
    made: list[str] = []
    names = [_create_database(pg_admin_url, made, "lf_dropper") for _ in range(3)]
    kept = _create_database(pg_admin_url, made, "lf_dropper")
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
    assert [_exists(pg_admin_url, name) for name in names] == [False, False, False]
    assert _exists(pg_admin_url, kept)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{kept}"')  # type: ignore[arg-type]
