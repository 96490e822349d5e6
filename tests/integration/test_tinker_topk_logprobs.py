"""Top-k logprobs of a sample (`topk_prompt_logprobs`, `topk_sample_logprobs`) through the
Tinker-compatible API: the official `tinker` SDK over a real socket reads them from the
protobuf answer, a plain HTTP client reads the same values as JSON, and a teacher's top-k over a
student's sequence distils into the student with `cross_entropy`. Real PostgreSQL, the real
executor on the tiny test base, each value checked against the base loaded anew by
transformers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response

from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import SEQUENCE, sdk_service, tinker_settings
from tests.unit.test_interactive_engine import fresh_model
from tests.unit.test_interactive_topk_logprobs import assert_topk, next_token_logprobs

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
# The executor runs the base in bf16 where the CPU has it; the references here are fp32.
BF16 = 2e-2


def test_the_sdk_reads_the_bases_top_k_at_each_prompt_position_and_each_sampled_token(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    prompt = SEQUENCE[:10]
    model_input = types.ModelInput.from_ints(prompt)
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)
        asked = sampler.sample(
            model_input, 1, GREEDY, topk_prompt_logprobs=5, topk_sample_logprobs=3
        )
        last = sampler.sample(
            model_input,
            1,
            GREEDY,
            include_prompt_logprobs=True,
            topk_prompt_logprobs=5,
            prompt_logprobs_last_n=3,
        )
        plain = sampler.sample(model_input, 1, GREEDY)
        answered, last_n, unasked = (f.result(timeout=120) for f in (asked, last, plain))
    base = fresh_model()

    # Row p: the base's top 5 for prompt token p, from its distribution after token p - 1.
    rows = answered.topk_prompt_logprobs
    assert rows is not None and len(rows) == len(prompt) and rows[0] is None
    assert_topk(rows[1:], next_token_logprobs(base, prompt)[:-1], 5, BF16)
    assert answered.prompt_logprobs is None  # not asked for

    # Greedy: each generated token is the first of its top 3 (or tied with it, in bf16), with
    # its own logprob.
    [sequence] = answered.sequences
    assert sequence.topk_logprobs is not None and sequence.logprobs is not None
    assert len(sequence.topk_logprobs) == len(sequence.tokens) == 4
    reference = next_token_logprobs(base, prompt + sequence.tokens)[-5:-1]
    assert_topk(sequence.topk_logprobs, reference, 3, BF16)
    for token, logprob, row in zip(
        sequence.tokens, sequence.logprobs, sequence.topk_logprobs, strict=True
    ):
        assert (token, pytest.approx(logprob, abs=1e-6)) in row
        assert row[0][1] == pytest.approx(logprob, abs=1e-6)

    # `prompt_logprobs_last_n` bounds the top-k rows too; none asked, none answered.
    assert last_n.topk_prompt_logprobs is not None
    assert last_n.topk_prompt_logprobs[:-3] == [None] * (len(prompt) - 3)
    assert last_n.topk_prompt_logprobs[-3:] == rows[-3:]
    assert last_n.sequences[0].topk_logprobs is None
    assert unasked.topk_prompt_logprobs is None
    assert unasked.sequences[0].topk_logprobs is None
    assert unasked.sequences[0].tokens == sequence.tokens


def _post(http: httpx.Client, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    answered = http.post(path, json=body, headers=headers)
    assert answered.status_code == 200, answered.text
    return answered


def _retrieve(http: httpx.Client, request_id: str, **headers: str) -> httpx.Response:
    """The call's answer once it has one (the API answers try-again while it runs)."""
    deadline = time.monotonic() + 120
    while True:
        answered = _post(http, "/retrieve_future", {"request_id": request_id}, **headers)
        if "protobuf" in answered.headers["content-type"] or answered.json().get("type") != (
            "try_again"
        ):
            return answered
        assert time.monotonic() < deadline, "the sample was not answered"


def test_the_json_answer_carries_the_top_k_the_protobuf_answer_does(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    key = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=key, timeout=30) as http:
        session = _post(http, "/create_session", {"tags": [], "sdk_version": "t"}).json()
        sampler = _post(
            http,
            "/create_sampling_session",
            {
                "session_id": session["session_id"],
                "sampling_session_seq_id": 0,
                "base_model": executor,
            },
        ).json()["sampling_session_id"]
        prompt = SEQUENCE[:7]
        asked = {
            "sampling_session_id": sampler,
            "seq_id": 0,
            "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "sampling_params": {"max_tokens": 3, "temperature": 1.0, "seed": 4, "stop": []},
            "topk_prompt_logprobs": 4,
            "topk_sample_logprobs": 2,
        }
        request_id = _post(http, "/asample", asked).json()["request_id"]
        as_json = _retrieve(http, request_id).json()
        as_proto = _retrieve(http, request_id, accept="application/x-protobuf")
    assert "protobuf" in as_proto.headers["content-type"]
    read = deserialize_sample_response(as_proto.content)

    def pairs(rows: list[Any]) -> list[Any]:
        return [None if row is None else [tuple(pair) for pair in row] for row in rows]

    assert as_json["topk_prompt_logprobs"][0] is None
    assert pairs(as_json["topk_prompt_logprobs"]) == read.topk_prompt_logprobs
    reference = next_token_logprobs(fresh_model(), prompt)[:-1]
    assert_topk(pairs(as_json["topk_prompt_logprobs"])[1:], reference, 4, BF16)
    assert len(as_json["sequences"]) == len(read.sequences) == 2
    for sequence, sdk in zip(as_json["sequences"], read.sequences, strict=True):
        assert len(sequence["topk_logprobs"]) == len(sequence["tokens"]) == 3
        assert all(len(row) == 2 for row in sequence["topk_logprobs"])
        assert pairs(sequence["topk_logprobs"]) == sdk.topk_logprobs


def test_more_than_20_top_k_logprobs_are_refused_naming_the_field_and_the_bound(
    live_url: str, tenant_a: TenantKeys
) -> None:
    body = {
        "sampling_session_id": "isamp-none",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
        "sampling_params": {},
    }
    key = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=key, timeout=30) as http:
        for field in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            refused = http.post("/asample", json={**body, field: 21})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == field
            assert refused.json()["error"]["message"] == (
                f"{field}: Input should be less than or equal to 20"
            )
            # 20 is taken: what answers is that the sampler does not exist.
            assert http.post("/asample", json={**body, field: 20}).status_code == 404


def test_a_teachers_top_k_prompt_logprobs_distil_into_a_student_with_cross_entropy(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """The teacher (the base trained on SEQUENCE) scores the student's own sample; its top 4
    at each position become (N, 4) targets, weighted by their probabilities renormalised over
    the 4. The student's loss is that cross-entropy over its logprobs of the targets (a fresh
    LoRA starts as the base), and a step on it lowers it."""
    k = 4
    learned = types.Datum(
        model_input=types.ModelInput.from_ints(SEQUENCE[:-1]),
        loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
    )
    adam = types.AdamParams(learning_rate=1e-2)
    with sdk_service(live_url, tenant_a.member) as service:
        teacher = service.create_lora_training_client(base_model=executor, rank=4, seed=0)
        teacher = teacher.result(timeout=120)
        for _ in range(3):
            teacher.forward_backward([learned], "cross_entropy").result(timeout=120)
            teacher.optim_step(adam).result(timeout=120)
        teaching = teacher.save_weights_and_get_sampling_client().result(timeout=120)
        student = service.create_lora_training_client(base_model=executor, rank=4, seed=1)
        student = student.result(timeout=120)
        own = student.save_weights_and_get_sampling_client().result(timeout=120)
        drawn = own.sample(
            types.ModelInput.from_ints(SEQUENCE[:5]),
            1,
            types.SamplingParams(max_tokens=6, temperature=1.0, seed=2, stop=[]),
        )
        sequence = SEQUENCE[:5] + drawn.result(timeout=120).sequences[0].tokens
        scored = teaching.sample(
            types.ModelInput.from_ints(sequence),
            1,
            types.SamplingParams(max_tokens=1),
            topk_prompt_logprobs=k,
        )
        rows = scored.result(timeout=120).topk_prompt_logprobs
        assert rows is not None and rows[0] is None and all(len(r) == k for r in rows[1:])

        # Input position i predicts token i + 1: its targets are row i + 1's tokens.
        targets = np.array([[token for token, _ in row] for row in rows[1:]], dtype=np.int64)
        teacher_logprobs = np.array([[lp for _, lp in row] for row in rows[1:]], dtype=np.float64)
        weights = np.exp(teacher_logprobs)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
        distilled = types.Datum(
            model_input=types.ModelInput.from_ints(sequence[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(targets),
                "weights": types.TensorData.from_numpy(weights),
            },
        )
        first = student.forward_backward([distilled], "cross_entropy").result(timeout=120)
        student.optim_step(adam).result(timeout=120)
        second = student.forward([distilled], "cross_entropy").result(timeout=120)

    # The student's logprobs of the targets: the base's (fp32 here, bf16 on the executor).
    base = next_token_logprobs(fresh_model(), sequence[:-1])
    student = base.gather(-1, torch.from_numpy(targets)).numpy()
    assert targets[:, 0].tolist() != base.argmax(-1).tolist()  # the teacher is not the base
    logprobs = first.loss_fn_outputs[0]["logprobs"]
    assert logprobs.shape == [len(sequence) - 1, k]
    assert logprobs.to_numpy() == pytest.approx(student, abs=BF16)
    # Cross-entropy over the (N, K) targets: minus the weighted sum of the logprobs.
    expected = -float((weights.astype(np.float64) * logprobs.to_numpy()).sum())
    assert first.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(-float((weights * student).sum()), rel=1e-2)
    assert second.metrics["loss:sum"] < first.metrics["loss:sum"]
