"""A streamed chat's text so far, written to its call while the executor samples it.

A chat asked with `stream: true` (`POST /v1/chat/completions`) is sampled as any sample call
is, batched with others; the engine hands `StreamWriter` each streamed chat's text so far
every `chat_stream_every_seconds` (`InteractiveEngine.stream_to`), and it writes them to their
calls (`interactive_calls.progress`, which notifies the API's stream). A write is best effort:
the whole text is the call's answer, recorded as every answer is, so a write the database
refuses (an outage) is logged and streaming pauses a while rather than hold the batch up.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from control_plane import interactive_calls as calls
from control_plane.services import Services
from workers.interactive.chat import is_streamed

log = logging.getLogger(__name__)

# After a write that failed, how long the text so far is not written (the answer still is).
PAUSE_AFTER_FAILURE_S = 10.0


def streamed_request(call: calls.Call) -> dict[str, Any]:
    """The call's request as the engine takes it: a streamed chat's `stream` names the call, the
    key its text so far is handed back under."""
    return {**call.request, "stream": call.id} if is_streamed(call.request) else call.request


class StreamWriter:
    """Writes the text so far of the streamed chats an executor samples to their calls."""

    def __init__(self, services: Services, executor_id: str) -> None:
        self.services = services
        self.executor_id = executor_id
        self.written = 0
        self._paused_until = 0.0

    def __call__(self, texts: dict[str, list[str]]) -> None:
        if time.monotonic() < self._paused_until:
            return
        try:
            with self.services.engine.begin() as conn:
                self.written += calls.progress(conn, self.executor_id, texts)
        except SQLAlchemyError as exc:
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            log.warning("streamed chats' text so far not written (%s): paused a while", exc)
