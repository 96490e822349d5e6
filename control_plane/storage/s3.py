"""`S3ObjectStore`: any S3-compatible endpoint through boto3 (multipart, server-verified
checksums, write-once by conditional put)."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from control_plane.storage.interface import (
    CHUNK_SIZE,
    DEFAULT_MULTIPART_THRESHOLD,
    MAX_PRESIGN_SECONDS,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    copy_hashing,
    hash_file,
    verify,
)
from control_plane.storage.keys import validate_key, validate_prefix

_S3_MIN_PART_SIZE = 5 * 1024 * 1024
_S3_MAX_PARTS = 10_000
_S3_DELETE_BATCH = 1000


# --------------------------------------------------------------------------- S3


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


P = ParamSpec("P")
R = TypeVar("R")


def _s3_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Translate botocore's errors that a method lets through into `ObjectStoreUnavailableError`:
    nothing outside `storage/` sees (or imports) botocore."""

    @functools.wraps(method)
    def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ObjectStoreUnavailableError(f"S3 {method.__name__} failed: {exc}") from exc

    return translated


def _translated_chunks(key: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The body's chunks, with a failure mid-read translated like `_s3_errors` does."""
    try:
        yield from chunks
    except (BotoCoreError, ClientError) as exc:
        raise ObjectStoreUnavailableError(f"S3 read of {key!r} failed: {exc}") from exc


_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_EXISTS_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3ObjectStore(ObjectStore):
    """Objects in an S3 bucket (AWS, MinIO, moto), every key under `prefix`.

    Each upload carries its sha256 twice: as the S3 checksum (`ChecksumSHA256`, per part for
    multipart uploads), which the server verifies on receipt, and as hex in the object's
    metadata (`x-amz-meta-sha256`), which `head` returns and every read checks against.
    Write-once uses S3 conditional writes (`If-None-Match: *` on PutObject and
    CompleteMultipartUpload), so the server decides the single winner; a HEAD before the
    upload only fails fast. A server that ignores `If-None-Match` is left with that HEAD alone,
    which two simultaneous writers can both pass. Uploads at or above `multipart_threshold` use a multipart upload that is
    aborted on any failure, so a failed upload leaves nothing behind.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        part_size: int = DEFAULT_MULTIPART_THRESHOLD,
        max_concurrency: int = 4,
        spool_dir: Path | None = None,
    ) -> None:
        if part_size < _S3_MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {_S3_MIN_PART_SIZE} bytes (S3 minimum)")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max(1, max_concurrency)
        self.spool_dir = spool_dir

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key_of(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def location(self, key: str) -> str:
        trail = "/" if key.endswith("/") else ""
        return f"s3://{self.bucket}/{self._full(validate_key(key.rstrip('/')))}{trail}"

    @_s3_errors
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet (dev, CI and bundled MinIO)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise
        region = self.client.meta.region_name
        params: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**params)
        except ClientError as exc:
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    # writes

    @_s3_errors
    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, write_once: bool = False
    ) -> ObjectInfo:
        validate_key(key)
        size, digest = hash_file(path)
        verify(key, digest, sha256)
        with path.open("rb") as src:
            self._upload(key, src, size, digest, write_once=write_once)
        return ObjectInfo(key=key, size=size, sha256=digest)

    @_s3_errors
    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        max_bytes: int | None = None,
        write_once: bool = False,
    ) -> ObjectInfo:
        # The sha256 goes into the object's metadata, which S3 fixes when the upload starts:
        # spool to a local temp file while hashing (bounded by max_bytes), then upload.
        validate_key(key)
        with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
            size, digest = copy_hashing(stream, spool, key=key, max_bytes=max_bytes)
            spool.seek(0)
            self._upload(key, spool, size, digest, write_once=write_once)
        return ObjectInfo(key=key, size=size, sha256=digest)

    @_s3_errors
    def put_bytes(self, key: str, data: bytes, *, write_once: bool = False) -> ObjectInfo:
        validate_key(key)
        digest = hashlib.sha256(data).hexdigest()
        self._upload(key, io.BytesIO(data), len(data), digest, write_once=write_once)
        return ObjectInfo(key=key, size=len(data), sha256=digest)

    def _upload(self, key: str, src: BinaryIO, size: int, digest: str, *, write_once: bool) -> None:
        if write_once and self.exists(key):
            raise ObjectExistsError(key)  # fail fast; the conditional write below decides races
        conditional = {"IfNoneMatch": "*"} if write_once else {}
        try:
            if size >= self.multipart_threshold:
                self._upload_multipart(key, src, size, digest, conditional)
            else:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._full(key),
                    Body=src,
                    ContentLength=size,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(bytes.fromhex(digest)),
                    Metadata={"sha256": digest},
                    **conditional,
                )
        except ClientError as exc:
            if write_once and _error_code(exc) in _EXISTS_CODES:
                raise ObjectExistsError(key) from exc
            raise

    def _upload_multipart(
        self, key: str, src: BinaryIO, size: int, digest: str, conditional: dict[str, str]
    ) -> None:
        # Parts are read in order and uploaded by a small pool; at most `max_concurrency`
        # parts are held in memory at once. Hashing the parts as they are read catches a
        # source that changed since `digest` was computed, before the upload completes.
        part_size = max(self.part_size, -(-size // _S3_MAX_PARTS))
        full = self._full(key)
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", Metadata={"sha256": digest}
        )["UploadId"]
        try:
            futures: list[Future[dict[str, Any]]] = []
            pending: set[Future[dict[str, Any]]] = set()
            whole = hashlib.sha256()
            with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
                number = 0
                while data := src.read(part_size):
                    number += 1
                    whole.update(data)
                    if len(pending) >= self.max_concurrency:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()  # a failed part stops the upload here
                    future = pool.submit(self._upload_part, full, upload_id, number, data)
                    futures.append(future)
                    pending.add(future)
                parts = [f.result() for f in futures]
            verify(key, whole.hexdigest(), digest)
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **conditional,
            )
        except BaseException:
            with contextlib.suppress(ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise

    def _upload_part(self, full: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        checksum = _b64(hashlib.sha256(data).digest())
        response = self.client.upload_part(
            Bucket=self.bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    # reads

    @_s3_errors
    def _open_reader(self, key: str) -> tuple[Iterator[bytes], Callable[[], None], str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(key) from None
            raise
        body = response["Body"]
        recorded = response.get("Metadata", {}).get("sha256")
        return _translated_chunks(key, body.iter_chunks(CHUNK_SIZE)), body.close, recorded

    @_s3_errors
    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND_CODES or code == "NoSuchBucket":
                raise ObjectStoreUnavailableError(f"bucket {self.bucket!r} does not exist") from exc
            if code in ("403", "AccessDenied"):
                raise ObjectStoreUnavailableError(
                    f"access to bucket {self.bucket!r} denied (check the credentials)"
                ) from exc
            raise ObjectStoreUnavailableError(f"bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreUnavailableError(f"S3 endpoint unreachable: {exc}") from exc

    def head(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            response = self.client.head_object(
                Bucket=self.bucket, Key=self._full(key), ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise
        size = int(response["ContentLength"])
        sha = response.get("Metadata", {}).get("sha256")
        if sha is None:
            # Not written by this store. A single-part SHA256 checksum is the object's own
            # sha256; a multipart one ("...-N") is not, so hash the object as a last resort.
            checksum = response.get("ChecksumSHA256")
            if checksum and "-" not in checksum:
                sha = base64.b64decode(checksum).hex()
            else:
                with self.open_stream(key) as stream:
                    for _ in stream:
                        pass
                return stream.info()
        return ObjectInfo(key=key, size=size, sha256=sha)

    @_s3_errors
    def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            raise
        return True

    @_s3_errors
    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            keys.extend(self._key_of(item["Key"]) for item in page.get("Contents", []))
        return sorted(keys)

    # deletes

    @_s3_errors
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(validate_key(key)))

    @_s3_errors
    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise ValueError("delete_prefix needs a non-empty prefix")
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[start : start + _S3_DELETE_BATCH]
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._full(k)} for k in batch], "Quiet": True},
            )
            if errors := response.get("Errors"):
                raise ObjectStoreError(f"could not delete {len(errors)} objects: {errors[:3]}")
        return len(keys)

    @_s3_errors
    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        if not 1 <= expires_s <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_SECONDS}")
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(validate_key(key))},
            ExpiresIn=expires_s,
        )
        return url


# --------------------------------------------------------------------------- factory


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> Any:
    """A boto3 S3 client; credentials left None fall back to boto3's usual chain (IRSA...).

    A custom endpoint (MinIO, moto) gets path-style addressing, which those servers expect.
    """
    # Imported here: boto3 takes about a second to import, and the embedded default (a local
    # directory) never needs it.
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )
