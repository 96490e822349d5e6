"""What a sample scores besides its tokens, through the Tinker-compatible API: top-k logprobs
(`topk_prompt_logprobs`, `topk_sample_logprobs`), the logprobs of chosen ids
(`target_prompt_logprobs`) and alternative tokens drawn at each prompt position
(`prompt_alt_tokens_k`). The official `tinker` SDK over a real socket reads them from the
protobuf answer, a plain HTTP client reads the same values as JSON, a bad request is refused
naming the field, and a teacher's top-k over a student's sequence distils into the student with
`cross_entropy`. Real PostgreSQL, the real executor on the tiny test base, each value checked
against the base loaded anew by transformers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response

from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import SEQUENCE, sdk_service, tinker_settings
from tests.unit.test_interactive_engine import fresh_model, target_ids
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


def _answered_both_ways(url: str, key: str, executor: str, asked: dict[str, Any]) -> Any:
    """A sample asked over plain HTTP (its sampling session made for it, on the base), then
    its answer read as JSON and as protobuf (decoded as the SDK decodes it): (JSON, decoded)."""
    with httpx.Client(
        base_url=url + "/api/v1", headers={"X-API-Key": "tml-" + key}, timeout=30
    ) as http:
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
        body = {"sampling_session_id": sampler, "seq_id": 0, **asked}
        request_id = _post(http, "/asample", body).json()["request_id"]
        as_json = _retrieve(http, request_id).json()
        as_proto = _retrieve(http, request_id, accept="application/x-protobuf")
    assert "protobuf" in as_proto.headers["content-type"]
    return as_json, deserialize_sample_response(as_proto.content)


def test_the_json_answer_carries_the_top_k_the_protobuf_answer_does(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    prompt = SEQUENCE[:7]
    asked = {
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": 3, "temperature": 1.0, "seed": 4, "stop": []},
        "topk_prompt_logprobs": 4,
        "topk_sample_logprobs": 2,
    }
    as_json, read = _answered_both_ways(live_url, tenant_a.member, executor, asked)

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


def sparse_targets(prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, 4] ids, -1 but in four cells: token 0 at position 1, the prompt's own
    token at position 4, two others at positions 7 and 9."""
    ids = torch.full((len(prompt) - 1, 4), -1)
    ids[0, 2], ids[3, 0], ids[6, 3], ids[8, 1] = 0, prompt[4], 500, 17
    return ids


def test_the_sdk_reads_target_logprobs_and_alternative_tokens_of_the_base(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    prompt = SEQUENCE[:10]
    model_input = types.ModelInput.from_ints(prompt)
    ids = sparse_targets(prompt)
    sparse = types.TensorData.from_torch_sparse(ids, pad_value=-1)
    assert sparse.sparse_crow_indices is not None  # the SDK sends these four cells alone
    own = torch.tensor(prompt[1:])[:, None]  # dense: each position's own token
    drawing = types.SamplingParams(max_tokens=2, temperature=1.0, seed=5, stop=[])
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)

        def asked(**options: Any) -> types.SampleResponse:
            return sampler.sample(model_input, 1, drawing, **options).result(timeout=120)

        targeted = asked(target_prompt_logprobs=sparse, prompt_alt_tokens_k=3)
        owned = asked(
            include_prompt_logprobs=True,
            target_prompt_logprobs=types.TensorData.from_torch(own),
        )
        again = asked(prompt_alt_tokens_k=3)
        reseeded = sampler.sample(
            model_input,
            1,
            types.SamplingParams(max_tokens=2, temperature=1.0, seed=6, stop=[]),
            prompt_alt_tokens_k=3,
        ).result(timeout=120)
        plain = asked()
    reference = next_token_logprobs(fresh_model(), prompt)[:-1]  # row i scores position i + 1

    # The targets, in the request's sparse layout: the base's logprobs of the four ids.
    target = targeted.target_prompt_logprobs
    assert target is not None and target.dtype == "float32" and target.shape == [9, 4]
    assert target.sparse_crow_indices == sparse.sparse_crow_indices
    assert target.sparse_col_indices == sparse.sparse_col_indices
    expected = reference.gather(-1, ids.clamp(min=0)).masked_fill(ids == -1, 0.0)
    assert target.to_torch() == pytest.approx(expected, abs=BF16)
    assert (target.to_torch()[ids == -1] == 0.0).all()
    # Dense: each position's own token, the logprob `prompt_logprobs` says there.
    assert owned.target_prompt_logprobs is not None and owned.prompt_logprobs is not None
    assert owned.target_prompt_logprobs.sparse_crow_indices is None
    assert owned.target_prompt_logprobs.to_torch()[:, 0].tolist() == pytest.approx(
        owned.prompt_logprobs[1:], abs=1e-6
    )

    # Three draws a position after the first, each with the base's logprob of it there; the
    # same seed draws the same, another seed others.
    drawn = targeted.prompt_alt_tokens
    assert drawn is not None and drawn.tokens.shape == drawn.logprobs.shape == [9, 3]
    tokens = drawn.tokens.to_torch()
    assert drawn.logprobs.to_torch() == pytest.approx(reference.gather(-1, tokens), abs=BF16)
    assert again.prompt_alt_tokens is not None and reseeded.prompt_alt_tokens is not None
    assert torch.equal(again.prompt_alt_tokens.tokens.to_torch(), tokens)
    assert not torch.equal(reseeded.prompt_alt_tokens.tokens.to_torch(), tokens)
    # Asked or not, the samples are the same; unasked, neither is answered.
    assert plain.sequences[0].tokens == targeted.sequences[0].tokens == again.sequences[0].tokens
    assert plain.target_prompt_logprobs is None and plain.prompt_alt_tokens is None


def test_the_json_answer_carries_the_targets_and_alternatives_the_protobuf_answer_does(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    prompt = SEQUENCE[:10]
    sparse = types.TensorData.from_torch_sparse(sparse_targets(prompt), pad_value=-1)
    asked = {
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": 3, "temperature": 0.7, "seed": 4, "stop": []},
        "target_prompt_logprobs": {
            "data": sparse.data,
            "dtype": "int64",
            "shape": sparse.shape,
            "sparse_crow_indices": sparse.sparse_crow_indices,
            "sparse_col_indices": sparse.sparse_col_indices,
        },
        "prompt_alt_tokens_k": 2,
    }
    as_json, read = _answered_both_ways(live_url, tenant_a.member, executor, asked)
    assert read.target_prompt_logprobs is not None and read.prompt_alt_tokens is not None

    target = as_json["target_prompt_logprobs"]
    assert target == {
        "data": target["data"],
        "dtype": "float32",
        "shape": [9, 4],
        "sparse_crow_indices": sparse.sparse_crow_indices,
        "sparse_col_indices": sparse.sparse_col_indices,
    }
    assert target["data"] == read.target_prompt_logprobs.data
    assert len(target["data"]) == 4 and all(value < 0 for value in target["data"])
    drawn = as_json["prompt_alt_tokens"]
    assert drawn["tokens"] == {
        "data": read.prompt_alt_tokens.tokens.data,
        "dtype": "int64",
        "shape": [9, 2],
    }
    assert drawn["logprobs"]["shape"] == [9, 2]
    assert drawn["logprobs"]["data"] == read.prompt_alt_tokens.logprobs.data
    reference = next_token_logprobs(fresh_model(), prompt)[:-1]
    tokens = torch.tensor(drawn["tokens"]["data"]).reshape(9, 2)
    assert drawn["logprobs"]["data"] == pytest.approx(
        reference.gather(-1, tokens).flatten().tolist(), abs=BF16
    )


REFUSED = [
    (
        "target_prompt_logprobs",
        target_ids(3, 2),
        "must have the shape [len(prompt) - 1, K] = [2, K]",
    ),
    ("target_prompt_logprobs", target_ids(2, 21), "with K from 1 to 20, got [2, 21]"),
    (
        "target_prompt_logprobs",
        target_ids(2, 1, [5, -2]),
        "holds -2: each cell is one of the base's",
    ),
    (
        "target_prompt_logprobs",
        {**target_ids(2, 3, [5]), "sparse_crow_indices": [0, 1, 1], "sparse_col_indices": [3]},
        "has sparse_col_indices that are not columns 0 to 2 rising in a row",
    ),
    ("target_prompt_logprobs", {**target_ids(2, 1), "dtype": "float32"}, "must be an int64 tensor"),
    ("prompt_alt_tokens_k", 21, "Input should be less than or equal to 20"),
]


def test_targets_that_do_not_fit_the_prompt_and_more_than_20_are_refused_naming_the_field(
    live_url: str, tenant_a: TenantKeys
) -> None:
    body = {
        "sampling_session_id": "isamp-none",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {},
    }
    key = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", headers=key, timeout=30) as http:
        for field, value, says in REFUSED:
            refused = http.post("/asample", json={**body, field: value})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == field
            assert refused.json()["error"]["message"].startswith(f"{field}: ")
            assert says in refused.json()["error"]["message"], refused.text
        # What fits is taken: what answers is that the sampler does not exist.
        for fits in (
            {"target_prompt_logprobs": target_ids(2, 20), "prompt_alt_tokens_k": 20},
            {
                "target_prompt_logprobs": {
                    **target_ids(2, 3, [0]),
                    "sparse_crow_indices": [0, 0, 1],
                    "sparse_col_indices": [2],
                }
            },
        ):
            assert http.post("/asample", json={**body, **fits}).status_code == 404


def test_a_target_past_the_vocabulary_fails_the_call_as_the_callers_error(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """Only the executor knows the base's vocabulary (768 ids): the call fails there, and the
    SDK raises the user's error naming the field."""
    prompt = SEQUENCE[:4]
    ids = types.TensorData.from_torch(torch.tensor([[5], [768], [-1]]))
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)
        future = sampler.sample(
            types.ModelInput.from_ints(prompt),
            1,
            types.SamplingParams(max_tokens=1),
            target_prompt_logprobs=ids,
        )
        with pytest.raises(tinker.RequestFailedError) as failed:
            future.result(timeout=120)
    assert failed.value.category == types.RequestErrorCategory.User
    assert (
        "target_prompt_logprobs holds 768: each cell is one of the base's token ids below 768"
        in (str(failed.value))
    )
