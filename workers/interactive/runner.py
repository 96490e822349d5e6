"""The interactive executor: runs the calls of Tinker-compatible sessions on one resident base.

It takes a model's calls one at a time in their order (`control_plane.interactive_calls`), runs
each on the engine (every model it holds is an adapter on the one resident base), and records
the answer the SDK's future returns. Saves go to the object store before their answer is
recorded, so a path the SDK gets back always names weights that exist. It reports itself in the
trainer registry like a trainer (its models live as long as it is heard from) and sleeps on
LISTEN until a call on its base is asked for. A database that goes away (a restart, a
failover) is waited out, each claim, answer and idle pass retried with backoff, so the weights
it holds outlive the outage.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DataError, IntegrityError

from control_plane import interactive_calls as calls
from control_plane import interactive_health, session_weights
from control_plane.base_catalog import get_base_model
from control_plane.interactive import NotFound
from control_plane.interactive_saves import SAVES, Saved
from control_plane.queue import QueueListener
from control_plane.services import Services
from control_plane.trainers import TrainerReport
from workers.bases.checkpoints import BaseCache
from workers.interactive.batching import (
    CPU_FORWARD_BATCH_TOKENS,
    FORWARDS,
    call_tokens,
    forward_input,
    gather,
)
from workers.interactive.calls_together import Failure, Outcome, failure, run_calls_together
from workers.interactive.engine import MICRO_BATCH_TOKENS, InteractiveEngine, InteractiveError
from workers.interactive.saving import save
from workers.interactive.streaming import StreamWriter, streamed_request
from workers.job_io import TrainerPresence, materialize_base, through_blips
from workers.training.device import RequestedPrecision, describe_device
from workers.training.resident import ResidentBase

log = logging.getLogger(__name__)

# How long the executor waits out a database that is away (each claim, answer, idle pass)
# before the error goes up and stops it: its models' weights are worth waiting for.
OUTAGE_PATIENCE_S = 600.0


class CheckpointNotFound(InteractiveError):
    """A tinker:// path that names no saved weights of this tenant."""


class InteractiveRunner:
    """Runs the interactive calls on `base_model_id` for one executor (`executor_id`)."""

    def __init__(
        self,
        services: Services,
        executor_id: str,
        base_model_id: str,
        *,
        work_dir: Path,
        precision: RequestedPrecision = "auto",
        engine_factory: Callable[[ResidentBase], InteractiveEngine] = InteractiveEngine,
    ) -> None:
        self.services = services
        self.executor_id = executor_id
        self.work_dir = Path(work_dir)
        with services.engine.connect() as conn:
            base = get_base_model(conn, base_model_id)
        if base is None:
            raise ValueError(f"no base model {base_model_id}")
        self.base = base
        path = materialize_base(services.store, BaseCache(self.work_dir / "bases"), base)
        self.resident = ResidentBase.load(path, precision=precision)
        self.engine = engine_factory(self.resident)
        self.stream_writer = StreamWriter(services, executor_id)
        self.engine.stream_to = self.stream_writer
        self.engine.stream_every_seconds = services.settings.chat_stream_every_seconds
        self.calls_run = 0
        # The saved samplers in the engine, least recently sampled first.
        self._samplers: OrderedDict[str, None] = OrderedDict()
        self.samplers_kept = services.settings.interactive_samplers_per_executor
        self.samplers_loaded = 0
        self.sample_batch = services.settings.interactive_sample_batch_calls
        self.forward_batch = services.settings.interactive_forward_batch_calls
        self.forward_batch_tokens = services.settings.interactive_forward_batch_tokens or (
            MICRO_BATCH_TOKENS if self.resident.device.type == "cuda" else CPU_FORWARD_BATCH_TOKENS
        )
        self.started_pid = os.getpid()
        # The notifications that arrived since the last look (`run_once`'s `woken`); and whether
        # a call was answered since a running batch's last offer.
        self._woken: Callable[[], list[tuple[str, str]]] | None = None
        self._answered = False
        self.device = describe_device()

    # -- the loop -----------------------------------------------------------------------------

    def serve(self, stop: threading.Event, *, idle_wait: float = 5.0) -> None:
        """Run calls until `stop` is set; idle, wait for a NOTIFY on the base (or `idle_wait`).
        Each idle pass also tidies up (`tidy`). The streamed chats' writer stops with it."""
        lease = self.services.settings.lease_seconds
        presence = TrainerPresence(self.services, self.snapshot, interval_s=lease / 4)
        listener = through_blips(
            lambda: QueueListener(self.services.database_url, (calls.CHANNEL,)),
            what="LISTEN",
            patience_s=OUTAGE_PATIENCE_S,
        )
        try:
            with presence, listener:
                while not stop.is_set():
                    if self.run_once(listener.drain):
                        continue
                    through_blips(self.tidy, what="idle pass", patience_s=OUTAGE_PATIENCE_S)
                    listener.wait(idle_wait)
        finally:
            self.stream_writer.close()

    def tidy(self) -> None:
        """An idle pass's housekeeping: free the models of executors that stopped, end the
        sessions whose SDK went silent, release this executor's unloaded models, fail what waits
        on models unloaded with no holder, and drop the
        weights of every model it no longer holds (unloaded, or released as lost while it could
        not report itself: another executor may hold it by now)."""
        settings = self.services.settings
        with self.services.engine.begin() as conn:
            interactive_health.tidy(
                conn, settings.lease_seconds, settings.interactive_session_timeout_seconds
            )
            calls.let_go_unloaded(conn, self.executor_id)
            held = calls.held_by(conn, self.executor_id)
        for model_id in self.engine.loaded():
            if model_id not in held:
                self._drop(model_id)

    def run_once(self, woken: Callable[[], list[tuple[str, str]]] | None = None) -> bool:
        """Take and run one call (a sample call with others, decoded together; a forward call
        with other models', run together); False when none can run now. `woken` tells a sample
        batch whether calls were asked since it last looked (the notifications that arrived:
        channel and base), so that it offers to take them only then (`_offer`); None: before
        every pass."""
        self._woken = woken
        taken = through_blips(self._claim, what="claim", patience_s=OUTAGE_PATIENCE_S)
        if not taken:
            return False
        if taken[0].kind == "sample":
            outcomes = run_calls_together(
                taken,
                lambda call: (self._sampler(call), streamed_request(call)),
                self.engine.sample_many,
                answer=self._answer,
                joining=(self._offer, self.sample_batch),
            )
        elif taken[0].kind in FORWARDS:
            outcomes = run_calls_together(
                taken,
                lambda call: (self._held(call), forward_input(call), call.kind != "forward"),
                lambda asked, _, __: self.engine.forward_many(asked),
            )
        else:
            outcomes = [self._one(taken[0])]
        for call, done in zip(taken, outcomes, strict=True):
            if done is not None:  # None: answered while the others ran
                self._answer(call, done)
        self.calls_run += len(taken)
        return True

    def _one(self, call: calls.Call) -> Outcome:
        try:
            return self._run(call)
        except Exception as exc:
            return failure(exc, [call])

    def _offer(self, join: Callable[[calls.Call], Callable[[], None] | None]) -> None:
        """The calls that can run now, offered in the order a claim takes them to a running
        sample batch (`join`) while the next is a sample call that it has room for: each
        claimed in a transaction of its own, committed before it is added to the batch. The
        first that is not (a call of another kind, so a batch never overtakes one; no room; a
        saved sampler not in memory, which is not loaded while the batch waits) is handed back
        (its transaction rolled back) and ends the offer. With `woken` (`serve`'s LISTEN
        connection), only once a call was asked on this base since the last look (a NOTIFY) or
        the batch answered one (that model's next call may run now); without, before every
        pass. A database error ends the offer, and the batch goes on; an error adding a call
        committed to it fails the batch (its calls then run again a call at a time)."""
        woken = self._woken
        if woken is not None:
            asked = any(payload == self.base.id for _, payload in woken())
            if not (asked or self._answered):
                return
        self._answered = False
        while True:
            add = None
            try:
                with self.services.engine.connect() as conn:
                    claim = conn.begin()
                    call = calls.claim_next(conn, self.executor_id, self.base.id)
                    if call is not None and call.kind == "sample" and self._in_memory(call):
                        add = join(call)
                    if add is None:
                        claim.rollback()
                        return
                    claim.commit()
            except Exception:
                log.warning("sample calls could not join the running batch", exc_info=True)
                if add is not None:  # its commit may have been made: left out, it would stay
                    add()  # running here; not made, its answer is dropped and it is claimed again
                return
            add()  # the call is the batch's now: an error here is the batch's

    def _in_memory(self, call: calls.Call) -> bool:
        """Whether what a sample call samples is in the engine now (a saved sampler's weights
        may still be in the object store)."""
        return (
            call.model_kind == "training"
            or call.model_path is None
            or self.engine.has(call.model_id)
        )

    def _answer(self, call: calls.Call, outcome: Outcome) -> None:
        self._answered = True
        if isinstance(outcome, Failure):
            self._failed(call, outcome.message, outcome.category)
            return
        result, checkpoint, release = outcome

        def record() -> bool:
            with self.services.engine.begin() as conn:
                return calls.finish(
                    conn,
                    call,
                    self.executor_id,
                    result,
                    checkpoint=checkpoint,
                    release_model=release,
                )

        # Its answer is kept while the database is away (the call stays this executor's for as
        # long as its lease does); past the patience it goes to release_lost.
        try:
            recorded = through_blips(record, what="answer", patience_s=OUTAGE_PATIENCE_S)
        except (IntegrityError, DataError) as refused:  # this answer's data, not the executor's
            log.exception("interactive call %s: its answer could not be recorded", call.id)
            self._failed(call, f"its answer could not be recorded: {refused.orig}", "server")
            return
        if not recorded:
            log.warning("interactive call %s was released while it ran: answer dropped", call.id)

    def snapshot(self) -> TrainerReport:
        """This executor as the trainer registry shows it (its base resident, no job)."""
        return TrainerReport(
            id=self.executor_id,
            host=socket.gethostname(),
            pid=self.started_pid,
            device=self.device,
            resident_base=self.base.name,
            claims=self.calls_run,
            kind="interactive",
        )

    def _claim(self) -> list[calls.Call]:
        """The next call; with a sample call, other models' sample calls that can run (the
        tenants in turn, never more saved samplers than the engine keeps), then each model's
        next ones, a call a model a round, up to `sample_batch`: decoded together, each tenant
        served in each batch."""
        with self.services.engine.begin() as conn:
            call = calls.claim_next(conn, self.executor_id, self.base.id)
            if call is not None and call.kind in FORWARDS:
                return self._other_forwards(conn, call)
            if call is None or call.kind != "sample":
                return [] if call is None else [call]

            def samples(taken: list[calls.Call]) -> bool:
                return len(taken) < self.sample_batch

            def samplers(taken: list[calls.Call]) -> bool:
                held = {c.model_id for c in taken if c.model_kind == "sampler"}
                return samples(taken) and len(held) < self.samplers_kept

            return gather(conn, self.executor_id, call, ["sample"], samplers, samples)

    def _other_forwards(self, conn: Connection, call: calls.Call) -> list[calls.Call]:
        """With a forward call, other models' forward calls that can run and each model's next
        ones (never past a call of another kind), up to `forward_batch` calls while their datums
        hold fewer than `forward_batch_tokens` tokens: run together, each model's datums through
        its own adapter."""

        def room(taken: list[calls.Call]) -> bool:
            held = sum(call_tokens(c) for c in taken)
            return len(taken) < self.forward_batch and held < self.forward_batch_tokens

        return gather(conn, self.executor_id, call, list(FORWARDS), room, room)

    def _failed(self, call: calls.Call, message: str, category: str) -> None:
        def record() -> None:
            with self.services.engine.begin() as conn:
                calls.fail(conn, call, self.executor_id, message, category=category)

        through_blips(record, what="answer", patience_s=OUTAGE_PATIENCE_S)

    # -- one call -----------------------------------------------------------------------------

    def _run(self, call: calls.Call) -> tuple[dict[str, Any], Saved | None, bool]:
        """(result, checkpoint written, whether the model is let go) of one call."""
        engine, model, request = self.engine, call.model_id, call.request
        if call.kind == "create_model":
            config = call.lora_config
            engine.create(
                model,
                rank=int(config.get("rank", 32)),
                seed=config.get("seed"),
                train_mlp=bool(config.get("train_mlp", True)),
                train_attn=bool(config.get("train_attn", True)),
                train_unembed=bool(config.get("train_unembed", True)),
            )
            return {"model_id": model, "type": "create_model"}, None, False
        if call.kind in FORWARDS:
            run = engine.forward_backward if call.kind == "forward_backward" else engine.forward
            return run(self._held(call), forward_input(call)), None, False
        if call.kind == "optim_step":
            return (
                engine.optim_step(self._held(call), request.get("adam_params") or {}),
                None,
                False,
            )
        if call.kind in SAVES:
            return self._save(call)
        if call.kind == "load_weights":
            with tempfile.TemporaryDirectory(dir=self._scratch()) as scratch:
                engine.load_state(
                    model,
                    self._download(call, str(request.get("path", "")), Path(scratch)),
                    with_optimizer=bool(request.get("optimizer", False)),
                )
            return (
                {"path": request.get("path"), "model_id": model, "type": "load_weights"},
                None,
                False,
            )
        if call.kind == "sample":
            return engine.sample(self._sampler(call), request), None, False
        if call.kind == "unload_model":
            self._drop(model)
            return {"model_id": model, "type": "unload_model"}, None, True
        raise InteractiveError(f"unknown call {call.kind!r}")

    def _held(self, call: calls.Call) -> str:
        if not self.engine.has(call.model_id):
            raise InteractiveError(
                f"model {call.model_id} holds no weights here: create it or load a saved state"
            )
        return call.model_id

    def _save(self, call: calls.Call) -> tuple[dict[str, Any], Saved, bool]:
        result, saved = save(
            self.services,
            self.engine,
            self._held(call),
            call,
            base_name=self.base.name,
            scratch=self._scratch(),
            patience_s=OUTAGE_PATIENCE_S,
        )
        return result, saved, False

    def _sampler(self, call: calls.Call) -> str | None:
        """The engine's name for what a sample call samples from: a training model's own
        adapter, a saved sampler's, or None for the base alone. A sampler's weights are in the
        object store, so the engine keeps only the `samplers_kept` used last (an RL loop makes
        a sampler each iteration); one dropped is loaded again when it is sampled again."""
        if call.model_kind == "training":
            return self._held(call)
        if call.model_path is None:
            return None
        self._samplers.pop(call.model_id, None)
        if not self.engine.has(call.model_id):
            with tempfile.TemporaryDirectory(dir=self._scratch()) as scratch:
                self.engine.load_sampler(
                    call.model_id, self._download(call, call.model_path, Path(scratch))
                )
            self.samplers_loaded += 1
        self._samplers[call.model_id] = None
        while len(self._samplers) > self.samplers_kept:
            self._drop(next(iter(self._samplers)))
        return call.model_id

    def _drop(self, model_id: str) -> None:
        """Let a model's (or a sampler's) weights go from the engine, if it has them."""
        self._samplers.pop(model_id, None)
        if self.engine.has(model_id):
            self.engine.drop(model_id)

    def _download(self, call: calls.Call, path: str, target: Path) -> Path:
        """The saved weights a tinker:// path names, of the call's tenant (or published by
        another), in `target`."""
        with self.services.engine.connect() as conn:
            try:
                shared = self.services.settings.tinker_public_checkpoints
                saved = session_weights.find(conn, call.tenant_id, path, shared=shared)
            except NotFound:
                raise CheckpointNotFound(f"no saved weights at {path!r}") from None
        if saved.encrypted:
            raise InteractiveError(
                f"the weights at {path!r} are encrypted to their age recipients, so the platform "
                "cannot read them: load a save_state or save_weights_for_sampler path"
            )
        self.services.store.download_prefix(saved.storage_prefix, target)
        return target

    def _scratch(self) -> Path:
        path = self.work_dir / "interactive"
        path.mkdir(parents=True, exist_ok=True)
        return path
