"""Object-store access: one small interface, a local-directory and an S3 implementation.

Everything the platform keeps outside Postgres (datasets, adapter versions, checkpoints, base
models) goes through `ObjectStore`. Every object carries its sha256, recorded at write time and
checked on every read, so a corrupted or truncated object is refused instead of served or
trained on. Versions are write-once: `write_once=True` makes exactly one of several concurrent
writers win, the rest get `ObjectExistsError`.

`LocalObjectStore` backs the embedded default; `S3ObjectStore` backs clusters (AWS S3, MinIO,
or moto in the tests). `make_object_store` picks one from settings.

Keys are `/`-separated relative paths, validated identically by both stores so that a key that
works in embedded mode works on a cluster too (see `validate_key`).
"""

from __future__ import annotations

from pathlib import Path

from control_plane.storage.interface import (
    CHUNK_SIZE,
    DEFAULT_MULTIPART_THRESHOLD,
    ChecksumMismatchError,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    ObjectTooLargeError,
    VerifiedStream,
)
from control_plane.storage.keys import (
    adapter_version_prefix,
    base_model_prefix,
    checkpoint_prefix,
    file_key,
    validate_key,
    validate_prefix,
)
from control_plane.storage.local import LocalObjectStore
from control_plane.storage.s3 import (
    S3ObjectStore,
    make_s3_client,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "ChecksumMismatchError",
    "LocalObjectStore",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailableError",
    "ObjectTooLargeError",
    "S3ObjectStore",
    "VerifiedStream",
    "adapter_version_prefix",
    "base_model_prefix",
    "checkpoint_prefix",
    "file_key",
    "make_object_store",
    "make_s3_client",
    "validate_key",
    "validate_prefix",
]


def make_object_store(
    *,
    local_root: Path | None,
    s3_endpoint_url: str | None,
    s3_bucket: str | None,
    s3_prefix: str,
    s3_region: str | None,
    s3_access_key_id: str | None,
    s3_secret_access_key: str | None,
) -> ObjectStore:
    """The store the settings describe: S3 when a bucket is set, else a local directory.

    Does not create the bucket; call `S3ObjectStore.ensure_bucket()` where that is wanted.
    """
    if s3_bucket:
        client = make_s3_client(
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            access_key_id=s3_access_key_id,
            secret_access_key=s3_secret_access_key,
        )
        return S3ObjectStore(client, s3_bucket, s3_prefix)
    if local_root is None:
        raise ValueError("configure either an S3 bucket or a local object-store directory")
    return LocalObjectStore(local_root)
