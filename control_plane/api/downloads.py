"""Stored objects as HTTP downloads that never complete with bytes failing their sha256.

A streamed response has sent its `200` before the last byte is read, so a check made after the
last chunk only tells the server's log. Instead the body is sent with `Content-Length` and its
last chunk is held back until the object's sha256 is verified (`VerifiedStream.held_back`): a
small object is checked before anything is sent and a corrupt one is answered `502
checksum_mismatch`; a larger corrupt one ends short of its `Content-Length`, which every HTTP
client (httpx, curl, the `openai` SDK, a serving cluster's fetcher) reports as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from control_plane.api.errors import ApiError, error_body
from control_plane.records import FileRecord
from control_plane.storage import (
    ChecksumMismatchError,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailableError,
)

log = logging.getLogger(__name__)


def file_download(
    store: ObjectStore, record: FileRecord, headers: dict[str, str] | None = None
) -> Response:
    """A file's bytes (a dataset, a batch's requests or answers: JSONL), as `verified_download`
    sends them; `ObjectNotFoundError` propagates."""
    return verified_download(
        store,
        record.object_key,
        sha256=record.sha256,
        size=record.bytes,
        filename=record.filename,
        media_type="application/jsonl",
        headers=headers,
    )


def verified_download(
    store: ObjectStore,
    key: str,
    *,
    sha256: str,
    size: int,
    filename: str,
    media_type: str,
    headers: dict[str, str] | None = None,
) -> Response:
    """The object's bytes, checked against `sha256` before the response can complete.

    `ObjectNotFoundError` propagates (each route words its own 404 or 410).
    """
    try:
        stream = store.open_stream(key, expected_sha256=sha256)
        body = stream.held_back(size)
    except ChecksumMismatchError as exc:
        log.error("refused to serve %s: %s", key, exc)
        return checksum_refusal(filename, exc)
    except ObjectStoreUnavailableError as exc:
        raise ApiError(
            503, "object_store_unavailable", f"{filename}: the object store failed: {exc}"
        ) from None
    return StreamingResponse(
        _cut_short_on_failure(body, key),
        media_type=media_type,
        headers={"Content-Length": str(size), "X-Content-SHA256": sha256, **(headers or {})},
        background=BackgroundTask(stream.close),
    )


def checksum_refusal(filename: str, exc: ChecksumMismatchError) -> JSONResponse:
    """`502 checksum_mismatch`, with both hashes (`loraforge.Client` raises `ChecksumError`)."""
    body = error_body(
        502,
        "checksum_mismatch",
        f"{filename}: the stored bytes hash to sha256 {exc.actual}, not the recorded "
        f"{exc.expected}; nothing was sent. The stored object is corrupt: tell the platform's "
        "operator.",
    )
    body["error"].update(expected_sha256=exc.expected, actual_sha256=exc.actual)
    return JSONResponse(body, status_code=502)


def _cut_short_on_failure(body: Iterator[bytes], key: str) -> Iterator[bytes]:
    """Say in the log why a response ended short; the error itself ends the connection."""
    try:
        yield from body
    except ObjectStoreError as exc:
        log.error("cut the response for %s short, before its last chunk: %s", key, exc)
        raise
