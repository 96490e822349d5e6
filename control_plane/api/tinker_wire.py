"""The Tinker SDK's protobuf wire format, for the three messages it will not send or take as JSON.

The official `tinker` SDK (0.38) always sends `forward_backward` (and `forward`) as a
`ForwardBackwardRequest` protobuf, and reads a forward's or a sample's result only as protobuf
(`ForwardBackwardOutput`, `SampleResponse`: it refuses those two as JSON). Everything else it
speaks is JSON. Rather than depend on `protobuf` and ship generated code for three messages,
this module reads and writes their wire encoding by hand (varints and length-delimited fields:
https://protobuf.dev/programming-guides/encoding/), with the field numbers of the SDK's
`tinker_public.proto`. Decoding yields the SDK's own JSON shape of the request, so one pydantic
schema validates both encodings; encoding takes the JSON an executor stored as a call's result.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Iterator
from typing import Any


class WireError(ValueError):
    """The bytes are not the message they claim to be; the text says where."""


# DType enum of tinker_public.proto and the array typecodes of each (little-endian on the wire).
_DTYPES = {1: ("float32", "f"), 2: ("int64", "q"), 3: ("int64", "i")}
_DTYPE_NUMBERS = {"float32": 1, "int64": 2}
_INT32 = 3
_TYPECODES = {"float32": "f", "int64": "q"}
_STOP_REASONS = {"stop": 0, "length": 1}


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for a varint, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise WireError(f"field {number} has wire type {wire}, which proto3 does not use")
        if pos > len(buf):
            raise WireError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, bytes):
        raise WireError(f"{where} is not a string")
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise WireError(f"{where} is not UTF-8") from None
    if "\x00" in text:
        raise WireError(f"{where} contains a NUL character (U+0000)")
    return text


def _numbers(raw: bytes, typecode: str, where: str) -> list[Any]:
    values = array(typecode)
    if len(raw) % values.itemsize:
        raise WireError(f"{where} is not a whole number of {values.itemsize}-byte values")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    numbers = values.tolist()
    # JSONB refuses NaN and infinities, and nothing here means to train on them.
    if typecode == "f" and not all(math.isfinite(v) for v in numbers):
        raise WireError(f"{where} holds a NaN or infinite value")
    return numbers


def _ints(value: Any, wire: int) -> list[int]:
    """A repeated int64: packed (one length-delimited run) or one varint per value."""
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        number, pos = _varint(value, pos)
        out.append(number)
    return out


def _tensor(buf: bytes, where: str) -> dict[str, Any]:
    dense: bytes | None = None
    csr: dict[int, bytes] | None = None
    dtype_number, shape = 0, []
    for number, wire, value in _fields(buf):
        if number == 1:
            dense = value
        elif number == 2:
            csr = {n: v for n, _, v in _fields(value)}
        elif number == 3:
            dtype_number = value
        elif number == 4:
            shape.extend(_ints(value, wire))
    if dtype_number not in (1, 2):
        raise WireError(f"{where}: dtype must be float32 or int64")
    dtype, typecode = _DTYPES[dtype_number]
    tensor: dict[str, Any] = {"dtype": dtype, "shape": shape or None}
    if csr is not None:
        tensor["data"] = _numbers(csr.get(1, b""), typecode, f"{where}.data")
        tensor["sparse_crow_indices"] = _numbers(csr.get(2, b""), "q", f"{where}.crow_indices")
        tensor["sparse_col_indices"] = _numbers(csr.get(3, b""), "q", f"{where}.col_indices")
    else:
        tensor["data"] = _numbers(dense or b"", typecode, f"{where}.data")
    return tensor


def _double(raw: bytes, where: str) -> float:
    if len(raw) != 8:
        raise WireError(f"{where} is not a double")
    value: float = struct.unpack("<d", raw)[0]
    if not math.isfinite(value):
        raise WireError(f"{where} is NaN or infinite")
    return value


def _map_entry(buf: bytes, where: str) -> tuple[str, bytes]:
    """A map entry's key and its value's bytes (a message, or a double's eight)."""
    key, value = "", None
    for number, _, item in _fields(buf):
        if number == 1:
            key = _text(item, f"{where} key")
        elif number == 2:
            value = item
    if not isinstance(value, bytes):
        raise WireError(f"{where}.{key or '?'} has no value")
    return key, value


def _datum(buf: bytes, where: str) -> dict[str, Any]:
    chunks: list[dict[str, Any]] = []
    inputs: dict[str, Any] = {}
    for number, _, value in _fields(buf):
        if number == 1:
            kinds = {n: v for n, _, v in _fields(value)}
            if set(kinds) != {1}:
                raise WireError(
                    f"{where}.model_input: only encoded_text chunks are supported, not images "
                    "or audio"
                )
            tokens = {n: v for n, _, v in _fields(kinds[1])}.get(1, b"")
            chunks.append(
                {"type": "encoded_text", "tokens": _numbers(tokens, "i", f"{where}.tokens")}
            )
        elif number == 2:
            name, tensor = _map_entry(value, f"{where}.loss_fn_inputs")
            inputs[name] = _tensor(tensor, f"{where}.loss_fn_inputs.{name}")
        elif number in (3, 4):
            raise WireError(f"{where}: provenance spans are not supported")
    return {"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs}


def decode_forward_backward(body: bytes) -> dict[str, Any]:
    """A `ForwardBackwardRequest` as the SDK's JSON shape of it, plus `forward_only`."""
    request: dict[str, Any] = {"forward_only": False}
    data: list[dict[str, Any]] = []
    loss_fn, config, config_v2 = "", {}, {}
    for number, _, value in _fields(body):
        if number == 1:
            request["model_id"] = _text(value, "model_id")
        elif number == 2:
            request["seq_id"] = value
        elif number == 3:
            data.append(_datum(value, f"forward_backward_input.data[{len(data)}]"))
        elif number == 4:
            loss_fn = _text(value, "loss_fn")
        elif number == 5:
            key, raw = _map_entry(value, "loss_fn_config")
            config[key] = _double(raw, f"loss_fn_config.{key}")
        elif number == 6:
            request["forward_only"] = bool(value)
        elif number == 7:
            key, raw = _map_entry(value, "loss_fn_config")
            for kind, _, item in _fields(raw):
                config_v2[key] = _double(item, key) if kind == 1 else _text(item, key)
    request["forward_backward_input"] = {
        "data": data,
        "loss_fn": loss_fn,
        # The SDK writes both maps; the second also carries strings, so it wins where set.
        "loss_fn_config": {**config, **config_v2} or None,
    }
    return request


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s go as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint_bytes(len(payload)) + payload


def _packed(values: list[Any], typecode: str) -> bytes:
    packed = array(typecode, values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _batched_tensor(tensor: dict[str, Any]) -> bytes:
    """One datum's tensor as a `BatchedTensor` of one: its bytes, offsets [0, size], and the
    shape past the leading dimension (the SDK recomputes the leading one from the size)."""
    dtype = tensor["dtype"]
    data = _packed(list(tensor["data"]), _TYPECODES[dtype])
    shape = list(tensor.get("shape") or [])
    trailing = b"".join(_varint_bytes(int(n)) for n in shape[1:])
    return (
        _field(1, data)
        + _field(2, _packed([0, len(data)], "q"))
        + _key(3, 0)
        + _varint_bytes(_DTYPE_NUMBERS[dtype])
        + (_field(4, trailing) if trailing else b"")
    )


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """`ForwardBackwardOutput` from its JSON shape (`loss_fn_output_type`, `loss_fn_outputs`: one
    `{name: {data, dtype, shape}}` per datum, `metrics`): one `ArrayRecord` per datum, so datums
    of different lengths need no padding."""
    out = _field(1, str(result.get("loss_fn_output_type") or "ArrayRecord").encode())
    for datum in result.get("loss_fn_outputs") or []:
        record = b"".join(
            _field(2, _field(1, name.encode()) + _field(2, _batched_tensor(tensor)))
            for name, tensor in datum.items()
        )
        out += _field(2, record + _key(3, 0) + _varint_bytes(1))
    for name, value in (result.get("metrics") or {}).items():
        entry = _field(1, name.encode()) + _key(2, 1) + struct.pack("<d", float(value))
        out += _field(3, entry)
    return out


def encode_sample_response(result: dict[str, Any]) -> bytes:
    """`SampleResponse` from its JSON shape: `sequences` of `{tokens, logprobs?, stop_reason,
    topk_logprobs?}`, `prompt_logprobs` (None where a position has none, NaN on the wire),
    `topk_prompt_logprobs?` (see `_topk_logprobs`), `target_prompt_logprobs?` (a TensorData,
    dense or CSR) and `prompt_alt_tokens?` (`{tokens, logprobs}`, two dense TensorData)."""
    out = b""
    for sequence in result.get("sequences") or []:
        stop = _STOP_REASONS[sequence.get("stop_reason") or "stop"]
        body = _key(1, 0) + _varint_bytes(stop) + _field(2, _packed(sequence["tokens"], "i"))
        if sequence.get("logprobs") is not None:
            body += _field(3, _packed(sequence["logprobs"], "f"))
        if sequence.get("topk_logprobs") is not None:
            body += _field(4, _topk_logprobs(sequence["topk_logprobs"]))
        out += _field(1, body)
    prompt = result.get("prompt_logprobs")
    if prompt is not None:
        out += _field(2, _packed([math.nan if v is None else v for v in prompt], "f"))
    if result.get("topk_prompt_logprobs") is not None:
        out += _field(3, _topk_logprobs(result["topk_prompt_logprobs"]))
    if result.get("target_prompt_logprobs") is not None:
        out += _field(5, _tensor_message(result["target_prompt_logprobs"]))
    alternatives = result.get("prompt_alt_tokens")
    if alternatives is not None:
        # The proto has the alternatives' token ids as int32, as every other token id.
        tokens = _tensor_message(alternatives["tokens"], wire_dtype=_INT32)
        out += _field(6, _field(1, tokens) + _field(2, _tensor_message(alternatives["logprobs"])))
    return out


def _tensor_message(tensor: dict[str, Any], wire_dtype: int | None = None) -> bytes:
    """`Tensor` from TensorData JSON, in its dtype or `wire_dtype` (a DType number): its values
    dense, or sparse with its CSR indices as int64, and its shape."""
    number = wire_dtype or _DTYPE_NUMBERS[tensor["dtype"]]
    values = _packed(list(tensor["data"]), _DTYPES[number][1])
    if tensor.get("sparse_crow_indices") is not None:
        crow = _packed(list(tensor["sparse_crow_indices"]), "q")
        col = _packed(list(tensor["sparse_col_indices"]), "q")
        encoding = _field(2, _field(1, values) + _field(2, crow) + _field(3, col))
    else:
        encoding = _field(1, values)
    shape = b"".join(_varint_bytes(int(n)) for n in tensor.get("shape") or [])
    return encoding + _key(3, 0) + _varint_bytes(number) + (_field(4, shape) if shape else b"")


# What fills a `TopkLogprobs` cell a position has no pair for (the SDK's `MASK_LOGPROB`): a row
# that starts with it reads as None, a row that ends with it as the pairs before.
_EMPTY_TOKEN, _EMPTY_LOGPROB = 0, -99999.0


def _topk_logprobs(rows: list[list[list[Any]] | None]) -> bytes:
    """`TopkLogprobs` from its JSON shape, one row a position: None, or `[token, logprob]`
    pairs. Its two dense (positions, k) matrices are row-major, k the longest row (1 when every
    row is None, so that the SDK still reads one None a position), shorter rows padded."""
    k = max((len(row) for row in rows if row is not None), default=0) or 1
    token_ids: list[int] = []
    logprobs: list[float] = []
    for row in rows:
        pairs = list(row or [])
        pairs += [[_EMPTY_TOKEN, _EMPTY_LOGPROB]] * (k - len(pairs))
        token_ids.extend(int(token) for token, _ in pairs)
        logprobs.extend(float(logprob) for _, logprob in pairs)
    return (
        _field(1, _packed(token_ids, "i"))
        + _field(2, _packed(logprobs, "f"))
        + _key(3, 0)
        + _varint_bytes(k)
        + _key(4, 0)
        + _varint_bytes(len(rows))
    )
