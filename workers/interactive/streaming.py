"""A streamed chat's reply so far, written to its call while the executor samples it.

A chat asked with `stream: true` (`POST /v1/chat/completions`; a completion too, `POST
/v1/completions`) is sampled as any sample call is, batched with others; the engine hands
`StreamWriter` each streamed chat's reply so far (`chat.SoFar`) every
`chat_stream_every_seconds` (`InteractiveEngine.stream_to`), and it writes them to their calls
(`interactive_calls.progress`, which notifies the API's stream) from a thread of its own, so the
batch never waits on the database. A chat streamed with `logprobs` has only its new entries sent
each time (appended to those its call stores), so a long reply's entries are sent once, not at
every write. A write is best effort: the whole text is the call's answer, recorded as every
answer is, so a write the database refuses (an outage) is logged and streaming pauses a while. A
write also learns which streams' clients left (`interactive_calls.leave_stream`): the engine
stops sampling those chats.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from control_plane import interactive_calls as calls
from control_plane.services import Services
from workers.interactive.chat import SoFar, is_streamed

log = logging.getLogger(__name__)

# The streams whose client left that are remembered: far more than a batch holds, so a
# stream is forgotten only long after its chat stopped.
LEFT_KEPT = 4096

# After a write that failed, how long the text so far is not written (the answer still is).
PAUSE_AFTER_FAILURE_S = 10.0


def streamed_request(call: calls.Call) -> dict[str, Any]:
    """The call's request as the engine takes it: a streamed chat's (or completion's) `stream`
    names the call, the key its text so far is handed back under."""
    return {**call.request, "stream": call.id} if is_streamed(call.request) else call.request


class StreamWriter:
    """Writes the text so far of the streamed chats an executor samples to their calls, from a
    thread of its own: the decoding loop hands it the newest texts and goes on (it never waits
    on the database), and a write takes whatever is newest for each call when it starts, so a
    slow write skips texts rather than queue them. A call already answered is not written
    (`progress` writes only running calls)."""

    def __init__(self, services: Services, executor_id: str) -> None:
        self.services = services
        self.executor_id = executor_id
        self.written = 0
        self._left: frozenset[str] = frozenset()
        self._gone: deque[str] = deque(maxlen=LEFT_KEPT)
        self._newest: dict[str, SoFar] = {}
        # Each call streaming logprobs: its decoding (`SoFar.run`) and each choice's entries
        # its call stores, as the last write found them (the most recent LEFT_KEPT calls).
        self._stored: dict[str, tuple[str, list[int]]] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self, replies: dict[str, SoFar]) -> None:
        with self._changed:
            if self._closed:  # the executor stopped serving: its answers hold the text
                return
            self._newest.update(replies)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._write_forever, name=f"stream-{self.executor_id}", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the writer's thread, once its write in progress ends (texts handed over and not
        written yet are dropped: each answer holds its text whole)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def left(self) -> frozenset[str]:
        """The streams whose client left, as the last writes found them."""
        return self._left

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                while not self._newest and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                replies, self._newest = self._newest, {}
            try:
                bodies = {call_id: self._body(call_id, reply) for call_id, reply in replies.items()}
                with self.services.engine.begin() as conn:
                    written = calls.progress(conn, self.executor_id, bodies)
                self.written += len(written)
                for call_id, was in written.items():
                    if was.entries is not None:
                        self._stored.pop(call_id, None)  # the newest last
                        self._stored[call_id] = (replies[call_id].run, was.entries)
                while len(self._stored) > LEFT_KEPT:
                    del self._stored[next(iter(self._stored))]
                gone = [call_id for call_id, was in written.items() if was.left]
                if gone:
                    self._gone.extend(c for c in gone if c not in self._left)
                    self._left = frozenset(self._gone)  # read by the decoding loop
            except Exception as exc:  # the answer is still recorded whole: streaming pauses
                log.warning("streamed chats' text so far not written (%s): paused a while", exc)
                with self._changed:
                    self._changed.wait_for(lambda: self._closed, PAUSE_AFTER_FAILURE_S)
                    self._newest.clear()  # stale by now; the next token brings the newest

    def _body(self, call_id: str, reply: SoFar) -> dict[str, Any]:
        """What is written of a reply: its texts, and each choice's entries past those its call
        stores (from the first where it stores another decoding's, or none)."""
        body: dict[str, Any] = {"texts": reply.texts}
        if reply.logprobs is not None:
            run, stored = self._stored.get(call_id, ("", []))
            if run != reply.run or len(stored) != len(reply.logprobs):
                stored = [0] * len(reply.logprobs)
            body["logprobs"] = [e[k:] for e, k in zip(reply.logprobs, stored, strict=True)]
            body["from"] = stored
            body["run"] = reply.run
        return body
