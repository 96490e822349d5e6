"""What a tenant's interactive sessions used, as the official `tinker` SDK's
`AdminClient.get_billing_usage` reads it (`/api/v1/billing/usage/events`), against the real
executor on the tiny test base: each completed call is metered when it is answered (training
tokens, a sample's prompt and sampled tokens, a save's checkpoint) and counted in its UTC hour,
base and session; a failed call is not; the counts outlive the calls' payloads; another
tenant sees none of them; a window the report does not cover is refused saying why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from control_plane import interactive_calls
from control_plane.services import Services
from control_plane.settings import Settings
from loraforge.client import Client, LoraforgeError
from loraforge.platform_admin import PlatformAdmin
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, SEQUENCE, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _window() -> tuple[datetime, datetime]:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return hour - timedelta(hours=1), hour + timedelta(hours=2)


def _totals(events: list[Any]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for event in events:
        info = event.event_info
        amount = info.count if info.type == "checkpoint" else info.token_count
        totals[info.type] = totals.get(info.type, 0) + amount
    return totals


def test_each_answered_call_is_metered_in_its_hour_base_and_session(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, executor: str
) -> None:
    key = "tml-" + tenant_a.member
    with tinker.ServiceClient(base_url=live_url, api_key=key, user_metadata={"run": "a"}) as sdk:
        training = sdk.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
            timeout=120
        )
        for _ in range(2):
            training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
        training.forward([DATUM, DATUM], "cross_entropy").result(timeout=120)
        unreadable = types.Datum(
            model_input=DATUM.model_input, loss_fn_inputs={"target_tokens": [10**9] * 23}
        )
        with pytest.raises(tinker.RequestFailedError):  # refused by the executor: not metered
            training.forward([unreadable], "cross_entropy").result(timeout=120)
        sampler = training.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(SEQUENCE[:6])
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
        sampled = sampler.sample(prompt, 2, params).result(timeout=120)
        session_id = sdk.holder.get_session_id()

    start, end = _window()
    admin = tinker.AdminClient(base_url=live_url, api_key=key)
    report = admin.get_billing_usage(start, end).result(timeout=60)
    assert _totals(report.data) == {
        "training": 4 * len(DATUM.model_input.to_ints()),
        "sampling_prefill": 6,  # the prompt once, for both samples
        "sampling_sample": sum(len(seq.tokens) for seq in sampled.sequences),
        "checkpoint": 1,
    }
    for event in report.data:
        assert event.session_id == session_id and event.base_model == executor
        assert event.bucket_start.minute == 0 and event.bucket_end - event.bucket_start == (
            timedelta(hours=1)
        )
        assert start <= event.bucket_start < end and event.estimated_cost_usd is None
    assert report.sessions[session_id].user_metadata == {"run": "a"}
    prefill = next(e for e in report.data if e.event_info.type == "sampling_prefill")
    assert prefill.event_info.cached is False

    # The answers are let go after an hour; what they used stays counted.
    assert interactive_calls.forget_payloads(services.engine, older_than_seconds=0) > 0
    again = admin.get_billing_usage(start, end).result(timeout=60)
    assert _totals(again.data) == _totals(report.data)

    # On the wire the counts are JSON integers, as Tinker sends them.
    raw = httpx.get(
        live_url + "/api/v1/billing/usage/events",
        params={"starting_on": start.isoformat(), "ending_before": end.isoformat()},
        headers={"X-API-Key": key},
    ).json()
    assert all(isinstance(e["event_info"].get("token_count", 0), int) for e in raw["data"])

    # The platform's operators read every tenant's totals for the same window (a tenant that
    # used nothing is left out); a tenant's own admin may not.
    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    totals = _totals(report.data)
    assert operator.usage(start.isoformat(), end.isoformat()) == [
        {
            "tenant": "tenant-a",
            "training_tokens": totals["training"],
            "prefill_tokens": totals["sampling_prefill"],
            "sampled_tokens": totals["sampling_sample"],
            "checkpoints": totals["checkpoint"],
            "trainer_seconds": 0.0,
            "fine_tuning_jobs": 0,
            "fine_tuning_trained_tokens": 0,
        }
    ]
    with pytest.raises(LoraforgeError) as refused:
        PlatformAdmin(Client(live_url, tenant_b.admin)).usage(start.isoformat(), end.isoformat())
    assert refused.value.status == 403
    with pytest.raises(LoraforgeError, match="at most 93 days") as too_long:
        operator.usage((start - timedelta(days=94)).isoformat(), start.isoformat())
    assert too_long.value.status == 400

    # Another tenant's report holds none of it; a window past the calls, nothing.
    other = tinker.AdminClient(base_url=live_url, api_key="tml-" + tenant_b.reader)
    assert other.get_billing_usage(start, end).result(timeout=60).data == []
    assert admin.get_billing_usage(start - timedelta(days=2), start).result(timeout=60).data == []


@pytest.mark.parametrize(
    ("starting_on", "ending_before", "said"),
    [
        ("2026-07-13T00:30:00Z", "2026-07-14T00:00:00Z", "hour boundary"),
        ("2026-07-01T00:00:00Z", "2026-07-16T00:00:00Z", "at most 14 days"),
        ("2026-07-14T00:00:00Z", "2026-07-13T00:00:00Z", "after starting_on"),
        ("2999-01-01T00:00:00Z", "2999-01-02T00:00:00Z", "in the future"),
    ],
)
def test_a_window_the_report_does_not_cover_is_refused_saying_why(
    live_url: str, tenant_a: TenantKeys, starting_on: str, ending_before: str, said: str
) -> None:
    admin = tinker.AdminClient(base_url=live_url, api_key="tml-" + tenant_a.reader)
    with pytest.raises(tinker.BadRequestError, match=said):
        admin.get_billing_usage(starting_on, ending_before).result(timeout=60)
