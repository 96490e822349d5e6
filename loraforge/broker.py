"""The broker of the embedded default and of a cluster without Redis: the database itself,
through kombu's SQLAlchemy transport, with one change: connecting asks the database.

kombu's transport "connects" without touching the database, so while PostgreSQL is down celery
connected at once, failed at its first poll, restarted its consumer five times a second and
logged a `RestartFreqExceeded` traceback each time (264 KB of log in 30 s of outage, measured).
With the check, a connection fails where celery expects it to, inside its reconnect loop with
backoff (2 s, 4 s, ... 30 s between tries): one line per try, and the worker carries on by
itself when the database is back.

A poll the outage cuts between its two queries (its queue found, its message not yet read) is
the same lost connection: kombu's `finally: commit()` turned it into `PendingRollbackError`,
which celery does not count as one, so the worker exited. `Channel` rolls the session back (so
it polls again once the database is back) and raises the `OperationalError` underneath.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, PendingRollbackError

SCHEME = "lfsqla"
"""The broker URL's scheme for this transport: `lfsqla+postgresql+psycopg://...`."""


class Channel(kombu_sqlalchemy.Channel):
    """kombu's channel whose failed poll leaves its session usable and says the connection was
    lost."""

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except OperationalError:
            self.session.rollback()
            raise
        except PendingRollbackError as exc:
            self.session.rollback()
            if isinstance(exc.__context__, OperationalError):
                raise exc.__context__ from None
            raise


class Transport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport whose connecting runs `SELECT 1` on the broker database."""

    Channel = Channel

    def establish_connection(self) -> Any:
        connection = super().establish_connection()
        channel = self._avail_channels[-1]
        engine, _ = channel._open()
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return connection


def register() -> None:
    """Make `lfsqla+` broker URLs resolve to `Transport` in this process (idempotent)."""
    TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
