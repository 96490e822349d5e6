"""A sample's `target_prompt_logprobs` and `prompt_alt_tokens_k` through the Tinker-compatible
API: the official `tinker` SDK over a real socket reads them from the protobuf answer as
`SampleResponse.target_prompt_logprobs` and `.prompt_alt_tokens`, a plain HTTP client reads the
same values as JSON, and a bad request is refused naming the field. Real PostgreSQL, the real
executor on the tiny test base, each value checked against the base loaded anew by
transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from tinker import types
from tinker.proto.response_conv import deserialize_sample_response

from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.integration.test_tinker_topk_logprobs import BF16, _post, _retrieve
from tests.tinker_harness import SEQUENCE, sdk_service, tinker_settings
from tests.unit.test_interactive_engine import fresh_model, target_ids
from tests.unit.test_interactive_topk_logprobs import next_token_logprobs

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


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
        asked = {
            "sampling_session_id": sampler,
            "seq_id": 0,
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
        request_id = _post(http, "/asample", asked).json()["request_id"]
        as_json = _retrieve(http, request_id).json()
        as_proto = _retrieve(http, request_id, accept="application/x-protobuf")
    assert "protobuf" in as_proto.headers["content-type"]
    read = deserialize_sample_response(as_proto.content)
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
