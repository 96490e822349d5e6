"""Object keys: validation shared by both stores, and the platform's key layout."""

from __future__ import annotations

import re
import uuid

_MAX_KEY_BYTES = 1024
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
RESERVED_TOP_LEVEL = ".objectstore"
"""Top-level directory of a `LocalObjectStore` that holds its temp files and sha256 sidecars."""


# --------------------------------------------------------------------------- keys


def _check_segment(segment: str, what: str) -> None:
    if segment in ("", ".", ".."):
        raise ValueError(f"invalid {what}: empty, '.' or '..' path segment")


def _check_chars(value: str, what: str) -> None:
    if "\\" in value:
        raise ValueError(f"invalid {what} {value!r}: backslashes are not allowed")
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"invalid {what} {value!r}: control characters are not allowed")
    if value.startswith("/"):
        raise ValueError(f"invalid {what} {value!r}: must be relative")
    if len(value.encode()) > _MAX_KEY_BYTES:
        raise ValueError(f"invalid {what}: longer than {_MAX_KEY_BYTES} bytes")


def validate_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise `ValueError`.

    A key is a relative `/`-separated path: no empty, `.` or `..` segments, no backslashes or
    control characters, at most 1024 bytes, and not under the local store's reserved
    `.objectstore/` directory. Both stores apply the same rule so keys stay portable, and so no
    key can escape a local store's root.
    """
    _check_chars(key, "object key")
    for segment in key.split("/"):
        _check_segment(segment, f"object key {key!r}")
    if key.split("/", 1)[0] == RESERVED_TOP_LEVEL:
        raise ValueError(f"invalid object key {key!r}: {RESERVED_TOP_LEVEL}/ is reserved")
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is a valid key prefix (empty, or a key's beginning), else raise."""
    if prefix == "":
        return prefix
    _check_chars(prefix, "key prefix")
    *dirs, _last = prefix.split("/")
    for segment in dirs:
        _check_segment(segment, f"key prefix {prefix!r}")
    if dirs and dirs[0] == RESERVED_TOP_LEVEL:
        raise ValueError(f"invalid key prefix {prefix!r}: {RESERVED_TOP_LEVEL}/ is reserved")
    return prefix


def _segment(value: object, what: str) -> str:
    text = str(value)
    if "/" in text:
        raise ValueError(f"{what} {text!r} must not contain '/'")
    _check_chars(text, what)
    _check_segment(text, what)
    return text


def file_key(tenant: str | uuid.UUID, file_id: str | uuid.UUID) -> str:
    """Key of an uploaded dataset file."""
    return f"tenants/{_segment(tenant, 'tenant')}/files/{_segment(file_id, 'file id')}"


def adapter_version_prefix(tenant: str | uuid.UUID, name: str, version: int | str) -> str:
    """Prefix (ending in `/`) under which one immutable adapter version's files live."""
    return (
        f"tenants/{_segment(tenant, 'tenant')}/adapters/{_segment(name, 'adapter name')}"
        f"/{_segment(version, 'version')}/"
    )


def checkpoint_prefix(tenant: str | uuid.UUID, job_id: str | uuid.UUID, step: int) -> str:
    """Prefix (ending in `/`) of a job's checkpoint at one training step."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    job = _segment(job_id, "job id")
    return f"tenants/{_segment(tenant, 'tenant')}/jobs/{job}/checkpoints/{step}/"


def base_model_prefix(sha256: str) -> str:
    """Prefix (ending in `/`) of a base model's files, addressed by its weights' sha256."""
    if not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"base model sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return f"base-models/{sha256}/"
