"""The broker of the embedded default and of a cluster without Redis: the database itself,
through kombu's SQLAlchemy transport, with two changes.

Connecting asks the database. kombu's transport "connects" without touching the database, so
while PostgreSQL is down celery connected at once, failed at its first poll, restarted its
consumer five times a second and logged a `RestartFreqExceeded` traceback each time (264 KB of
log in 30 s of outage, measured). With the check, a connection fails where celery expects it
to, inside its reconnect loop with backoff (2 s, 4 s, ... 30 s between tries): one line per
try, and the worker carries on by itself when the database is back.

A call the outage cuts leaves the channel usable. A poll cut between its two queries (its queue
found, its message not yet read) came out of kombu's `finally: commit()` as
`PendingRollbackError`, which celery does not count as a lost connection, so the worker exited;
any other call cut (a publish, a queue's size) left the session failed, so the channel's next
call raised it too. `Channel` rolls the session back and raises the `OperationalError`
underneath (a connection error to celery), and a call that finds the session failed from
before rolls it back and runs once more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, PendingRollbackError

SCHEME = "lfsqla"
"""The broker URL's scheme for this transport: `lfsqla+postgresql+psycopg://...`."""


class Channel(kombu_sqlalchemy.Channel):
    """kombu's channel whose session stays usable after the database went away under it: each
    of its calls that fails that way rolls the session back and raises the `OperationalError`
    (a connection error to celery), and a call that finds the session still failed from before
    rolls it back and runs once more."""

    def _get(self, queue: str) -> Any:
        return self._rolled_back(super()._get, queue)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> Any:
        return self._rolled_back(super()._put, queue, payload, **kwargs)

    def _new_queue(self, queue: str, **kwargs: Any) -> Any:
        return self._rolled_back(super()._new_queue, queue, **kwargs)

    def _size(self, queue: str) -> Any:
        return self._rolled_back(super()._size, queue)

    def _purge(self, queue: str) -> Any:
        return self._rolled_back(super()._purge, queue)

    def _rolled_back(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (OperationalError, PendingRollbackError) as exc:
            self._lost(exc)  # returns only where the session was still failed from before
        try:
            return call(*args, **kwargs)
        except (OperationalError, PendingRollbackError) as exc:
            self._lost(exc)
            raise

    def _lost(self, exc: Exception) -> None:
        """Roll the session back, and raise the lost connection under `exc` if there is one."""
        self.session.rollback()
        if isinstance(exc, OperationalError):
            raise exc
        if isinstance(exc.__context__, OperationalError):  # `_get`'s commit, after it
            raise exc.__context__ from None


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
