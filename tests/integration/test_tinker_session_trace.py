"""A session's timeline as a Perfetto trace, through the official `tinker` SDK's
`RestClient.export_session_trace` and `tinker session export-trace` against the API on a real
socket and the real executor (tiny test base): the signed URL downloads without a key a trace
that Perfetto's own protos read back as one track per model, each call a slice of its kind from
the moment an executor took it to its answer, at the database's times, a failed call with its
error, and a counter of the calls waiting that ends at none; another tenant's session and a URL
the platform did not sign are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent
from sqlalchemy import text
from tinker import types

from control_plane import session_traces
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _ns(when: Any) -> int:
    return int(when.timestamp() * 1_000_000) * 1000


def _read(trace_bytes: bytes) -> dict[str, Any]:
    """The trace as Perfetto's protos read it: track names by uuid, each track's slices in order
    (name, begin, end, arguments) and each counter track's values."""
    trace = Trace.FromString(trace_bytes)
    names: dict[int, str] = {}
    parents: dict[int, int] = {}
    slices: dict[int, list[tuple[str, int, int, dict[str, Any]]]] = defaultdict(list)
    counters: dict[int, list[tuple[int, float]]] = defaultdict(list)
    open_slices: dict[int, tuple[str, int, dict[str, Any]]] = {}
    for packet in sorted(trace.packet, key=lambda p: p.timestamp):
        if packet.HasField("track_descriptor"):
            names[packet.track_descriptor.uuid] = packet.track_descriptor.name
            parents[packet.track_descriptor.uuid] = packet.track_descriptor.parent_uuid
            continue
        event = packet.track_event
        if event.type == TrackEvent.TYPE_SLICE_BEGIN:
            assert event.track_uuid not in open_slices, "a model's calls never overlap"
            args = {
                a.name: a.int_value if a.HasField("int_value") else a.string_value
                for a in event.debug_annotations
            }
            open_slices[event.track_uuid] = (event.name, packet.timestamp, args)
        elif event.type == TrackEvent.TYPE_SLICE_END:
            name, begin, args = open_slices.pop(event.track_uuid)
            slices[event.track_uuid].append((name, begin, packet.timestamp, args))
        elif event.type == TrackEvent.TYPE_COUNTER:
            counters[event.track_uuid].append((packet.timestamp, event.counter_value))
    assert not open_slices
    return {"names": names, "parents": parents, "slices": slices, "counters": counters}


def test_a_sessions_calls_download_as_a_perfetto_trace_at_their_own_times(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    tmp_path: Path,
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(base_model=executor, rank=4).result(
            timeout=120
        )
        for _ in range(2):
            training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            training.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        bad = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3]),
            loss_fn_inputs={"target_tokens": [10**9, 2, 3], "weights": [1.0, 1.0, 1.0]},
        )
        with pytest.raises(Exception):  # noqa: B017 - the SDK's error for a failed call
            training.forward([bad], "cross_entropy").result(timeout=120)
        sampler = training.save_weights_and_get_sampling_client("traced")
        sampler.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=3)
        ).result(timeout=120)
    with services.engine.connect() as conn:
        session_id = conn.execute(
            text("SELECT id FROM interactive_sessions WHERE tenant_id = :t"),
            {"t": tenant_a.tenant_id},
        ).scalar_one()
    _settled(services, session_id)  # the session's end unloads its models: a last call each
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.model_id, m.kind AS model_kind, c.kind, c.seq, c.status, c.started_at, "
                "c.finished_at, c.error FROM interactive_calls c JOIN interactive_models m "
                "ON m.id = c.model_id WHERE m.session_id = :s ORDER BY c.model_id, c.seq"
            ),
            {"s": session_id},
        ).all()

    rest = tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_a.reader)
    url = rest.export_session_trace(session_id).result(timeout=60)
    downloaded = httpx.get(url)  # no key: the URL is signed
    assert downloaded.status_code == 200
    read = _read(downloaded.content)

    by_model: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_model[row.model_id].append(row)
    assert len(by_model) == 2  # the training run and the sampler
    tracks = {name: uuid for uuid, name in read["names"].items()}
    session_track = tracks[f"session {session_id}"]
    for model_id, calls in by_model.items():
        kind = "training run" if calls[0].model_kind == "training" else "sampler"
        track = tracks[f"{kind} {model_id}"]
        assert read["parents"][track] == session_track
        expected = [
            (c.kind, _ns(c.started_at), _ns(c.finished_at), c.seq, c.status)
            for c in calls
            if c.started_at is not None and c.finished_at is not None
        ]
        got = [(n, b, e, a["seq"], a["status"]) for n, b, e, a in read["slices"][track]]
        assert got == expected
        # The calls waiting: never below none, back to none once every call was taken.
        values = [v for _, v in read["counters"][tracks[f"{model_id} calls waiting"]]]
        assert min(values) == 0 and max(values) >= 1 and values[-1] == 0
    kinds = [s[0] for s in read["slices"][tracks[f"training run {by_model_id(rows)}"]]]
    assert kinds[:5] == [
        "create_model",
        "forward_backward",
        "optim_step",
        "forward_backward",
        "optim_step",
    ]
    failed = [
        s
        for s in read["slices"][tracks[f"training run {by_model_id(rows)}"]]
        if s[3]["status"] == "failed"
    ]
    assert len(failed) == 1 and failed[0][0] == "forward" and failed[0][3]["error"]
    assert all("executor" in s[3] for t in read["slices"].values() for s in t)

    # The CLI writes the same trace.
    env = {**os.environ, "HOME": str(tmp_path), "TINKER_BASE_URL": live_url}
    env |= {"TINKER_API_KEY": "tml-" + tenant_a.reader, "TINKER_TELEMETRY": "0"}
    out = tmp_path / "session.pftrace"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker.cli",
            "session",
            "export-trace",
            session_id,
            "--output",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert _read(out.read_bytes())["slices"] == read["slices"]

    # Past its cap a session is traced by its newest calls, and its track says so.
    with services.engine.connect() as conn:
        newest = session_traces.session_calls(conn, tenant_a.tenant_id, session_id, most=3)
    capped = _read(session_traces.build(session_id, newest))
    assert f"session {session_id} (its newest 3 calls of {len(rows)})" in capped["names"].values()
    assert sum(len(t) for t in capped["slices"].values()) == 3
    assert [c.seq for c in newest.calls if c.kind == "unload_model"]  # the last calls are kept

    # Another tenant's session is not found; a URL the platform did not sign is refused.
    other = tinker.RestClient(base_url=live_url, api_key="tml-" + tenant_b.member)
    with pytest.raises(tinker.NotFoundError):
        other.export_session_trace(session_id).result(timeout=60)
    forged = httpx.get(url.rsplit("/", 1)[0] + "/not-a-token")
    assert forged.status_code == 403 and "not a trace URL" in forged.text


def _settled(services: Services, session_id: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with services.engine.connect() as conn:
            open_calls = conn.execute(
                text(
                    "SELECT count(*) FROM interactive_calls c JOIN interactive_models m "
                    "ON m.id = c.model_id WHERE m.session_id = :s "
                    "AND c.status IN ('pending', 'running')"
                ),
                {"s": session_id},
            ).scalar_one()
        if open_calls == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the session's calls did not all finish")


def by_model_id(rows: list[Any]) -> str:
    """The training run's id among the session's calls."""
    return next(r.model_id for r in rows if r.model_kind == "training")
