"""What a finished interactive call answers the `tinker` SDK's `retrieve_future`
(`routes/tinker.py`): its result (protobuf for a forward or a sample when the SDK accepts it,
JSON otherwise), its failure, or why its answer is no longer kept."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from control_plane import interactive
from control_plane.api import tinker_wire
from control_plane.interactive import CallKind, CallStatus

PROTOBUF = "application/x-protobuf"
# The answers the SDK reads only as protobuf, from the JSON the executor stored.
_PROTOBUF_ANSWERS = {
    CallKind.FORWARD_BACKWARD: tinker_wire.encode_forward_backward_output,
    CallKind.FORWARD: tinker_wire.encode_forward_backward_output,
    CallKind.SAMPLE: tinker_wire.encode_sample_response,
}


def answer(call: interactive.CallRecord, protobuf: bool) -> Response:
    """What a finished call answers the SDK. The executor stores a result in the SDK's JSON
    shapes; the fields the call's row settles (its model, the sampler made for a save) are
    taken from the row."""
    if call.payload_dropped_at is not None:
        return JSONResponse(
            {
                "error": f"the answer of {call.id} was let go: a finished call's answer is kept "
                "for LORAFORGE_INTERACTIVE_CALL_RETENTION_SECONDS (an hour by default); read it "
                "sooner, or ask again",
                "category": "user",
            }
        )
    if call.status == CallStatus.FAILED:
        error = call.error or {}
        category = error.get("category") if error.get("category") in ("user", "server") else None
        return JSONResponse(
            {
                "error": str(error.get("error") or "the call failed"),
                "category": category or "server",
            }
        )
    result = dict(call.result or {})
    encode = _PROTOBUF_ANSWERS.get(CallKind(call.kind))
    if encode is None:
        known: dict[str, Any] = {"type": call.kind}
        if call.kind in (CallKind.CREATE_MODEL, CallKind.UNLOAD_MODEL, CallKind.LOAD_WEIGHTS):
            known["model_id"] = call.model_id
        if call.request.get("sampling_session_id"):
            known["sampling_session_id"] = call.request["sampling_session_id"]
        return JSONResponse({**result, **known})
    if not protobuf:
        return JSONResponse(result)
    try:
        return Response(encode(result), media_type=PROTOBUF)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        return JSONResponse(
            {"error": f"the executor's answer cannot be encoded: {exc!r}", "category": "server"}
        )
