"""Wake-ups for the polls of Tinker futures: a call that finishes wakes the polls waiting on it.

Every update that finishes an interactive call notifies `loraforge_interactive_done` with
`<model_id> <call_id>` when its transaction commits (revision 0033's trigger), as does each write
of a streamed chat's text so far (`interactive_calls.progress`: its stream wakes). Each API process
listens on one connection of its own, an asyncio task in the server's event loop for as long as
the app runs (its lifespan), and sets the events of the polls waiting on that call (a
`retrieve_future`) or on that model (a sampling client's `retrieve_futures`). A poll registers
before its first look, so a call finished during the look wakes the poll's next wait at once.

The polls keep their timed looks (`routes.tinker_futures.hold_until`) as they were: a notification
lost (the listening connection dropped, the database restarting) costs the poll its next look's
wait, never its answer. A lost connection is reopened every `REOPEN_EVERY_S` while the database
stays away. Behind a pooler that does not keep a session (PgBouncer in transaction mode),
LISTEN does not work: `LORAFORGE_TINKER_WAKE_ON_FINISH=false` runs no listener.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psycopg

from control_plane.db import libpq_url

log = logging.getLogger(__name__)

CHANNEL = "loraforge_interactive_done"
REOPEN_EVERY_S = 5.0


class CallWakeups:
    """The waiting polls of one API process, by the call or the model they wait on."""

    def __init__(self, database_url: str) -> None:
        self._url = libpq_url(database_url)
        self._waiting: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.listening = False  # the LISTEN connection is open and listening now

    @contextmanager
    def waiting(self, *keys: str) -> Iterator[asyncio.Event]:
        """An event set when a call named by `keys` (call ids, model ids) finishes, for the
        block's duration; the poller clears it before each wait."""
        event = asyncio.Event()
        for key in keys:
            self._waiting[key].add(event)
        try:
            yield event
        finally:
            for key in keys:
                events = self._waiting.get(key)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._waiting[key]

    def wake(self, payload: str) -> None:
        """Wake the polls waiting on the call or the model a notification names."""
        for key in payload.split(" "):
            for event in self._waiting.get(key, ()):
                event.set()

    def start(self) -> None:
        """Listen in the running event loop until `stop`."""
        self._task = asyncio.get_running_loop().create_task(self._listen(), name="call-wakeups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=5
                )
            except psycopg.Error as exc:
                log.warning("wake-ups: cannot connect (%s); trying again", str(exc).strip()[:200])
                await asyncio.sleep(REOPEN_EVERY_S)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    # Polls that looked while nothing listened look again at once.
                    self._wake_everyone()
                    async for notify in conn.notifies():
                        self.wake(notify.payload)
            except psycopg.Error as exc:
                log.warning(
                    "wake-ups: LISTEN connection lost (%s); reopening it", str(exc).strip()[:200]
                )
            finally:
                self.listening = False
            await asyncio.sleep(REOPEN_EVERY_S)

    def _wake_everyone(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()
