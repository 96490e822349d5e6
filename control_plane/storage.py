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

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

from botocore.exceptions import ClientError

CHUNK_SIZE = 1024 * 1024
"""Bytes read or written per step when streaming."""

DEFAULT_MULTIPART_THRESHOLD = 8 * 1024 * 1024
"""Uploads at least this large go to S3 as multipart uploads."""

_S3_MIN_PART_SIZE = 5 * 1024 * 1024
_S3_MAX_PARTS = 10_000
_S3_DELETE_BATCH = 1000
_MAX_KEY_BYTES = 1024
_MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED_TOP_LEVEL = ".objectstore"
"""Top-level directory of a `LocalObjectStore` that holds its temp files and sha256 sidecars."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one stored object."""

    key: str
    size: int
    sha256: str


class ObjectStoreError(Exception):
    """Base of every error the object store raises on purpose."""


class ObjectExistsError(ObjectStoreError):
    """A write-once write found the key already taken."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} already exists and is write-once")
        self.key = key


class ObjectNotFoundError(ObjectStoreError):
    """The key holds no object."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} not found")
        self.key = key


class ObjectTooLargeError(ObjectStoreError):
    """A streamed upload ran past its `max_bytes`; nothing was stored."""

    def __init__(self, key: str, max_bytes: int) -> None:
        super().__init__(f"object {key!r} exceeds the limit of {max_bytes} bytes")
        self.key = key
        self.max_bytes = max_bytes


class ChecksumMismatchError(ObjectStoreError):
    """An object's content does not hash to the sha256 it should have."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for object {key!r}: expected {expected}, got {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


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
    if key.split("/", 1)[0] == _RESERVED_TOP_LEVEL:
        raise ValueError(f"invalid object key {key!r}: {_RESERVED_TOP_LEVEL}/ is reserved")
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is a valid key prefix (empty, or a key's beginning), else raise."""
    if prefix == "":
        return prefix
    _check_chars(prefix, "key prefix")
    *dirs, _last = prefix.split("/")
    for segment in dirs:
        _check_segment(segment, f"key prefix {prefix!r}")
    if dirs and dirs[0] == _RESERVED_TOP_LEVEL:
        raise ValueError(f"invalid key prefix {prefix!r}: {_RESERVED_TOP_LEVEL}/ is reserved")
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
    if not _SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"base model sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return f"base-models/{sha256}/"


# --------------------------------------------------------------------------- shared plumbing


def _verify(key: str, actual: str, *references: str | None) -> None:
    for expected in references:
        if expected is not None and expected != actual:
            raise ChecksumMismatchError(key, expected, actual)


def _copy_hashing(
    src: BinaryIO, dst: BinaryIO, *, key: str, max_bytes: int | None = None
) -> tuple[int, str]:
    """Copy `src` to `dst` chunk by chunk; return (size, sha256 hex). Raise past `max_bytes`."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK_SIZE):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLargeError(key, max_bytes)
        digest.update(chunk)
        dst.write(chunk)
    return size, digest.hexdigest()


def _hash_file(path: Path) -> tuple[int, str]:
    """Size and sha256 hex of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK_SIZE):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


class VerifiedStream(Iterator[bytes]):
    """Chunks of one object, hashed as they pass; the last step checks the sha256.

    A consumer that reads to the end either got exactly the stored bytes or sees a
    `ChecksumMismatchError` instead of the end of the stream. `size` and `sha256` are set once
    the stream is exhausted. Closing early (or `with`) releases the underlying file or response.
    """

    def __init__(
        self,
        key: str,
        chunks: Iterator[bytes],
        close: Callable[[], None],
        references: tuple[str | None, ...],
    ) -> None:
        self.key = key
        self.size = 0
        self.sha256: str | None = None
        self._chunks = chunks
        self._close = close
        self._references = references
        self._digest = hashlib.sha256()
        self._closed = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.close()
            actual = self._digest.hexdigest()
            _verify(self.key, actual, *self._references)
            self.sha256 = actual
            raise
        except BaseException:
            self.close()
            raise
        self.size += len(chunk)
        self._digest.update(chunk)
        return chunk

    def info(self) -> ObjectInfo:
        """Size and verified sha256, once the stream has been read to the end."""
        if self.sha256 is None:
            raise ObjectStoreError(f"stream of {self.key!r} was not read to the end")
        return ObjectInfo(key=self.key, size=self.size, sha256=self.sha256)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the interface


class ObjectStore(ABC):
    """A flat namespace of immutable-by-convention blobs, each with a recorded sha256.

    Implementations provide storage primitives; reads (`get_bytes`, `open_stream`,
    `download_to`) are shared and always verify what they return against the stored sha256
    and, when given, the caller's `expected_sha256`.
    """

    @abstractmethod
    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, write_once: bool = False
    ) -> ObjectInfo:
        """Store the file at `path`; if `sha256` is given the file must hash to it."""

    @abstractmethod
    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        max_bytes: int | None = None,
        write_once: bool = False,
    ) -> ObjectInfo:
        """Store what `stream` yields, chunk by chunk; nothing is stored if it fails or is
        longer than `max_bytes` (`ObjectTooLargeError`)."""

    def put_bytes(self, key: str, data: bytes, *, write_once: bool = False) -> ObjectInfo:
        """Store `data` (small objects: manifests, configs)."""
        return self.put_stream(key, io.BytesIO(data), write_once=write_once)

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and recorded sha256 of the object, or None if there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        return self.head(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if present (deleting a missing key is not an error)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3)."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; return how many.

        An empty prefix is refused: wiping the whole store is never what a caller means.
        """
        if not validate_prefix(prefix):
            raise ValueError("delete_prefix needs a non-empty prefix")
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        """A time-limited GET URL for the object, or None where the store has no such thing."""

    @abstractmethod
    def location(self, key: str) -> str:
        """Where a key (or prefix) lies, for people: `file:///...` or `s3://bucket/...`."""

    @abstractmethod
    def _open_reader(self, key: str) -> tuple[Iterator[bytes], Callable[[], None], str | None]:
        """Open the object for reading: (chunks, close, recorded sha256 if known).

        Raises `ObjectNotFoundError` right away, so that callers can answer 404 before they
        start streaming.
        """

    def open_stream(self, key: str, *, expected_sha256: str | None = None) -> VerifiedStream:
        """Stream the object's bytes in chunks, verified at the end (for streaming responses)."""
        chunks, close, recorded = self._open_reader(validate_key(key))
        return VerifiedStream(key, chunks, close, (expected_sha256, recorded))

    def get_bytes(self, key: str, *, expected_sha256: str | None = None) -> bytes:
        """The whole object in memory, verified."""
        with self.open_stream(key, expected_sha256=expected_sha256) as stream:
            return b"".join(stream)

    def download_to(
        self, key: str, path: Path, *, expected_sha256: str | None = None
    ) -> ObjectInfo:
        """Write the object to `path` atomically, verified.

        Bytes go to a temp file next to `path` that replaces it only once the sha256 checks
        out; on any failure the temp file is removed and `path` is left as it was.
        """
        with self.open_stream(key, expected_sha256=expected_sha256) as stream:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".part"
            )
            try:
                with os.fdopen(fd, "wb") as tmp:
                    for chunk in stream:
                        tmp.write(chunk)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
        return stream.info()


# --------------------------------------------------------------------------- local directory


def _collision(key: str, exc: OSError) -> ObjectStoreError:
    return ObjectStoreError(f"key {key!r} collides with an object or a key prefix: {exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore(ObjectStore):
    """Objects as plain files under `root` (the embedded default).

    `root/<key>` holds the bytes, so the tree can be browsed and read by other tools. Writes go
    to a temp file under `root/.objectstore/tmp/` (same filesystem), are fsynced, and then
    appear atomically: `os.replace` for overwrites, `os.link` for write-once (link fails if
    the name exists, so one concurrent writer wins). The sha256 lives in a JSON sidecar under
    `root/.objectstore/sha256/<key>` that also records the data file's inode: a sidecar left from
    another version of the file (a crash or an overwrite race between the two writes) is
    ignored rather than trusted, while in-place corruption of the data file keeps its inode
    and is therefore caught on read.

    Limitation of a filesystem: a key cannot also be a "directory" of other keys (`a` and
    `a/b` cannot both exist); the platform's layout never needs that.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._internal = self.root / _RESERVED_TOP_LEVEL
        self._tmp = self._internal / "tmp"
        self._sidecars = self._internal / "sha256"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._sidecars.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _sidecar(self, key: str) -> Path:
        return self._sidecars / key

    # writes

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, write_once: bool = False
    ) -> ObjectInfo:
        with path.open("rb") as src:
            return self._write(key, src, expected=sha256, max_bytes=None, write_once=write_once)

    def put_stream(
        self,
        key: str,
        stream: BinaryIO,
        *,
        max_bytes: int | None = None,
        write_once: bool = False,
    ) -> ObjectInfo:
        return self._write(key, stream, expected=None, max_bytes=max_bytes, write_once=write_once)

    def _write(
        self,
        key: str,
        src: BinaryIO,
        *,
        expected: str | None,
        max_bytes: int | None,
        write_once: bool,
    ) -> ObjectInfo:
        target = self._path(key)
        if write_once and target.exists():
            raise ObjectExistsError(key)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="data-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                size, digest = _copy_hashing(src, tmp, key=key, max_bytes=max_bytes)
                _verify(key, digest, expected)
                tmp.flush()
                os.fsync(tmp.fileno())
                inode = os.fstat(tmp.fileno()).st_ino
            self._publish(Path(tmp_name), target, key, write_once=write_once)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        self._write_sidecar(key, {"sha256": digest, "size": size, "inode": inode})
        return ObjectInfo(key=key, size=size, sha256=digest)

    def _publish(self, tmp: Path, target: Path, key: str, *, write_once: bool) -> None:
        # A concurrent delete may prune the freshly made parent directory: retry a few times.
        for attempt in range(3):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise _collision(key, exc) from exc
            try:
                if write_once:
                    os.link(tmp, target)
                else:
                    os.replace(tmp, target)
            except FileExistsError:
                raise ObjectExistsError(key) from None
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue
            except (IsADirectoryError, NotADirectoryError) as exc:
                raise _collision(key, exc) from exc
            _fsync_dir(target.parent)
            return

    def _write_sidecar(self, key: str, record: dict[str, Any]) -> None:
        sidecar = self._sidecar(key)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="sha256-")
        try:
            with os.fdopen(fd, "w") as tmp:
                json.dump(record, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, sidecar)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def _recorded_sha256(self, key: str, stat: os.stat_result) -> str | None:
        """The sidecar's sha256 if the sidecar belongs to the file with `stat`, else None."""
        try:
            record = json.loads(self._sidecar(key).read_text())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None
        if record.get("inode") != stat.st_ino or record.get("size") != stat.st_size:
            return None
        sha = record.get("sha256")
        return sha if isinstance(sha, str) else None

    # reads

    def _open_reader(self, key: str) -> tuple[Iterator[bytes], Callable[[], None], str | None]:
        try:
            file = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        recorded = self._recorded_sha256(key, os.fstat(file.fileno()))
        return iter(lambda: file.read(CHUNK_SIZE), b""), file.close, recorded

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        sha = self._recorded_sha256(key, stat)
        if sha is None:  # no sidecar of its own (crash, race): hash the file itself.
            size, sha = _hash_file(path)
            return ObjectInfo(key=key, size=size, sha256=sha)
        return ObjectInfo(key=key, size=stat.st_size, sha256=sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        directory = self.root / prefix.rpartition("/")[0]
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(directory):
            if Path(dirpath) == self.root and _RESERVED_TOP_LEVEL in dirnames:
                dirnames.remove(_RESERVED_TOP_LEVEL)
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    # deletes

    def delete(self, key: str) -> None:
        path = self._path(key)
        for file, top in ((path, self.root), (self._sidecar(key), self._sidecars)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                file.unlink()
            self._prune_empty_dirs(file.parent, top)

    @staticmethod
    def _prune_empty_dirs(directory: Path, top: Path) -> None:
        while directory != top and top in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty, already gone, or raced with a writer: stop.
                return
            directory = directory.parent

    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        validate_key(key)
        return None

    def location(self, key: str) -> str:
        trail = "/" if key.endswith("/") else ""
        return (self.root / validate_key(key.rstrip("/"))).as_uri() + trail


# --------------------------------------------------------------------------- S3


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


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

    def put_file(
        self, key: str, path: Path, *, sha256: str | None = None, write_once: bool = False
    ) -> ObjectInfo:
        validate_key(key)
        size, digest = _hash_file(path)
        _verify(key, digest, sha256)
        with path.open("rb") as src:
            self._upload(key, src, size, digest, write_once=write_once)
        return ObjectInfo(key=key, size=size, sha256=digest)

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
            size, digest = _copy_hashing(stream, spool, key=key, max_bytes=max_bytes)
            spool.seek(0)
            self._upload(key, spool, size, digest, write_once=write_once)
        return ObjectInfo(key=key, size=size, sha256=digest)

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
            _verify(key, whole.hexdigest(), digest)
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

    def _open_reader(self, key: str) -> tuple[Iterator[bytes], Callable[[], None], str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(key) from None
            raise
        body = response["Body"]
        recorded = response.get("Metadata", {}).get("sha256")
        return body.iter_chunks(CHUNK_SIZE), body.close, recorded

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

    def exists(self, key: str) -> bool:
        validate_key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            raise
        return True

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            keys.extend(self._key_of(item["Key"]) for item in page.get("Contents", []))
        return sorted(keys)

    # deletes

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._full(validate_key(key)))

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

    def presigned_url(self, key: str, expires_s: int = 300) -> str | None:
        if not 1 <= expires_s <= _MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_s must be between 1 and {_MAX_PRESIGN_SECONDS}")
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
