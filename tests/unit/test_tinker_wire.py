"""The hand-written Tinker protobuf codec (`control_plane.api.tinker_wire`) against the official
SDK's own generated code: what the SDK encodes decodes to its JSON shape, what the codec
encodes the SDK reads back exactly, and broken bytes are refused with where they broke."""

from __future__ import annotations

import numpy as np
import pytest
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from control_plane.api.tinker_wire import (
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)


def _request(*data: types.Datum, config: dict[str, float | str] | None = None) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=list(data), loss_fn="importance_sampling", loss_fn_config=config
        ),
        model_id="imdl-1",
        seq_id=7,
    )
    return forward_backward_request_to_proto(request).SerializeToString()


def test_a_forward_backward_the_sdk_encodes_decodes_to_its_json_shape() -> None:
    sparse = types.TensorData(
        data=[3, 4],
        dtype="int64",
        shape=[2, 3],
        sparse_crow_indices=[0, 1, 2],
        sparse_col_indices=[2, 0],
    )
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.EncodedTextChunk(tokens=[70000])]
        ),
        loss_fn_inputs={
            "target_tokens": sparse,
            "advantages": types.TensorData.from_numpy(np.array([0.5, -1.25], dtype=np.float32)),
        },
    )
    decoded = decode_forward_backward(_request(datum, config={"clip": 0.2, "mode": "token"}))
    assert decoded == {
        "model_id": "imdl-1",
        "seq_id": 7,
        "forward_only": False,
        "forward_backward_input": {
            "loss_fn": "importance_sampling",
            "loss_fn_config": {"clip": pytest.approx(0.2), "mode": "token"},
            "data": [
                {
                    "model_input": {
                        "chunks": [
                            {"type": "encoded_text", "tokens": [1, 2]},
                            {"type": "encoded_text", "tokens": [70000]},
                        ]
                    },
                    "loss_fn_inputs": {
                        "target_tokens": {
                            "dtype": "int64",
                            "shape": [2, 3],
                            "data": [3, 4],
                            "sparse_crow_indices": [0, 1, 2],
                            "sparse_col_indices": [2, 0],
                        },
                        "advantages": {"dtype": "float32", "shape": [2], "data": [0.5, -1.25]},
                    },
                }
            ],
        },
    }


def test_broken_or_unsupported_bytes_are_refused_saying_where() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": [1.0]}
    )
    whole = _request(datum)
    with pytest.raises(WireError, match="past the end"):
        decode_forward_backward(whole[:-2])
    with pytest.raises(WireError, match="wire type"):
        decode_forward_backward(b"\x0f")
    nan = types.Datum(
        model_input=types.ModelInput.from_ints([1]), loss_fn_inputs={"weights": [float("nan")]}
    )
    with pytest.raises(WireError, match=r"data\[0\]\.loss_fn_inputs\.weights\.data holds a NaN"):
        decode_forward_backward(_request(nan))
    image = types.Datum(
        model_input=types.ModelInput(chunks=[types.ImageChunk(data=b"x", format="png")]),
        loss_fn_inputs={"weights": [1.0]},
    )
    with pytest.raises(WireError, match="only encoded_text chunks"):
        decode_forward_backward(_request(image))


def test_what_the_codec_encodes_the_sdk_reads_back_exactly() -> None:
    output = deserialize_forward_backward_output(
        encode_forward_backward_output(
            {
                "loss_fn_output_type": "ArrayRecord",
                "loss_fn_outputs": [
                    {
                        "logprobs": {"data": [-0.5, -1.5, -2.0], "dtype": "float32", "shape": [3]},
                        "ids": {"data": [1, 2], "dtype": "int64", "shape": [1, 2]},
                    },
                    {
                        "logprobs": {"data": [-3.0], "dtype": "float32", "shape": [1]},
                        "ids": {"data": [3, 4, 5, 6], "dtype": "int64", "shape": [2, 2]},
                    },
                ],
                "metrics": {"loss:sum": 7.0},
            }
        )
    )
    assert output.metrics == {"loss:sum": 7.0}
    assert [d["logprobs"].tolist() for d in output.loss_fn_outputs] == [[-0.5, -1.5, -2.0], [-3.0]]
    assert [d["ids"].tolist() for d in output.loss_fn_outputs] == [[[1, 2]], [[3, 4], [5, 6]]]

    sample = deserialize_sample_response(
        encode_sample_response(
            {
                "sequences": [
                    {"tokens": [7, 8], "logprobs": [-0.25, -0.5], "stop_reason": "length"},
                    {"tokens": [9], "logprobs": None, "stop_reason": "stop"},
                ],
                "prompt_logprobs": [None, -1.5],
            }
        )
    )
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in sample.sequences] == [
        ([7, 8], [-0.25, -0.5], "length"),
        ([9], None, "stop"),
    ]
    assert sample.prompt_logprobs == [None, -1.5]


def test_top_k_logprobs_the_codec_encodes_the_sdk_reads_as_rows_none_where_none_computed() -> None:
    """A position without a row (the prompt's first, those before `prompt_logprobs_last_n`)
    reads as None; a row shorter than the widest is padded and reads back as its own pairs."""
    sample = deserialize_sample_response(
        encode_sample_response(
            {
                "sequences": [
                    {
                        "tokens": [7, 8],
                        "logprobs": [-0.25, -0.5],
                        "stop_reason": "length",
                        "topk_logprobs": [[[7, -0.25], [0, -1.5]], [[8, -0.5], [3, -2.0]]],
                    },
                    {"tokens": [9], "logprobs": [-1.0], "stop_reason": "stop"},
                ],
                "prompt_logprobs": None,
                "topk_prompt_logprobs": [None, [[3, -0.5], [4, -1.0]], [[5, -0.125]]],
            }
        )
    )
    assert sample.topk_prompt_logprobs == [None, [(3, -0.5), (4, -1.0)], [(5, -0.125)]]
    assert sample.prompt_logprobs is None
    assert sample.sequences[0].topk_logprobs == [[(7, -0.25), (0, -1.5)], [(8, -0.5), (3, -2.0)]]
    assert sample.sequences[1].topk_logprobs is None

    # A one-token prompt has no row at all: still one None a position, not "not asked".
    only_first = deserialize_sample_response(
        encode_sample_response({"sequences": [], "topk_prompt_logprobs": [None]})
    )
    assert only_first.topk_prompt_logprobs == [None]
    unasked = deserialize_sample_response(encode_sample_response({"sequences": []}))
    assert unasked.topk_prompt_logprobs is None


def test_target_logprobs_and_alternative_tokens_the_codec_encodes_the_sdk_reads_as_tensors() -> (
    None
):
    """Targets keep their layout (dense, or sparse with its CSR indices); the alternatives are
    two dense [len(prompt) - 1, k] tensors, token ids and their logprobs."""
    alternatives = {
        "tokens": {"data": [7, 8, 9, 3, 3, 4], "dtype": "int64", "shape": [3, 2]},
        "logprobs": {
            "data": [-0.5, -1.0, -1.5, -2.0, -2.0, -3.0],
            "dtype": "float32",
            "shape": [3, 2],
        },
    }
    dense = {"data": [-0.25, 0.0, -1.5, -2.0], "dtype": "float32", "shape": [2, 2]}
    sample = deserialize_sample_response(
        encode_sample_response(
            {"sequences": [], "target_prompt_logprobs": dense, "prompt_alt_tokens": alternatives}
        )
    )
    assert sample.target_prompt_logprobs is not None and sample.prompt_alt_tokens is not None
    assert sample.target_prompt_logprobs.shape == [2, 2]
    assert sample.target_prompt_logprobs.tolist() == [[-0.25, 0.0], [-1.5, -2.0]]
    tokens, logprobs = sample.prompt_alt_tokens.tokens, sample.prompt_alt_tokens.logprobs
    assert (tokens.dtype, tokens.shape, tokens.tolist()) == (
        "int64",
        [3, 2],
        [[7, 8], [9, 3], [3, 4]],
    )
    assert (logprobs.dtype, logprobs.tolist()) == (
        "float32",
        [[-0.5, -1.0], [-1.5, -2.0], [-2.0, -3.0]],
    )

    sparse = {
        "data": [-0.5, -4.0],
        "dtype": "float32",
        "shape": [3, 4],
        "sparse_crow_indices": [0, 1, 1, 2],
        "sparse_col_indices": [2, 0],
    }
    read = deserialize_sample_response(
        encode_sample_response({"sequences": [], "target_prompt_logprobs": sparse})
    ).target_prompt_logprobs
    assert read is not None and read.sparse_crow_indices == [0, 1, 1, 2]
    assert read.sparse_col_indices == [2, 0] and read.shape == [3, 4]
    assert read.tolist() == [[0.0, 0.0, -0.5, 0.0], [0.0] * 4, [-4.0, 0.0, 0.0, 0.0]]

    # A one-token prompt has no position to score: empty tensors, still answered.
    empty = {"data": [], "dtype": "float32", "shape": [0, 3]}
    only_first = deserialize_sample_response(
        encode_sample_response({"sequences": [], "target_prompt_logprobs": empty})
    )
    assert only_first.target_prompt_logprobs is not None
    assert only_first.target_prompt_logprobs.to_numpy().shape == (0, 3)
    unasked = deserialize_sample_response(encode_sample_response({"sequences": []}))
    assert unasked.target_prompt_logprobs is None and unasked.prompt_alt_tokens is None
