"""The object-store interface, its errors, and the hashing plumbing both stores share."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

from control_plane.storage.keys import validate_key, validate_prefix

CHUNK_SIZE = 1024 * 1024
"""Bytes read or written per step when streaming."""

DEFAULT_MULTIPART_THRESHOLD = 8 * 1024 * 1024
"""Uploads at least this large go to S3 as multipart uploads."""

MAX_PRESIGN_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows about one stored object."""

    key: str
    size: int
    sha256: str


class ObjectStoreError(Exception):
    """Base of every error the object store raises on purpose."""


class ObjectStoreUnavailableError(ObjectStoreError):
    """The store's backend failed the request: unreachable, refused credentials or
    permissions, throttled. Each store translates its client's own errors (botocore's) into
    this, so that callers outside `storage/` handle one family of errors."""


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


class SizeMismatchError(ObjectStoreError):
    """An object holds more bytes than the size recorded for it."""

    def __init__(self, key: str, size: int) -> None:
        super().__init__(f"object {key!r} is longer than its recorded {size} bytes")
        self.key = key
        self.size = size


# --------------------------------------------------------------------------- shared plumbing


def verify(key: str, actual: str, *references: str | None) -> None:
    for expected in references:
        if expected is not None and expected != actual:
            raise ChecksumMismatchError(key, expected, actual)


def copy_hashing(
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


def hash_file(path: Path) -> tuple[int, str]:
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
            while not chunk:  # an empty chunk would let `held_back` release the last byte early
                chunk = next(self._chunks)
        except StopIteration:
            self.close()
            actual = self._digest.hexdigest()
            verify(self.key, actual, *self._references)
            self.sha256 = actual
            raise
        except BaseException:
            self.close()
            raise
        self.size += len(chunk)
        self._digest.update(chunk)
        return chunk

    def held_back(self, size: int) -> Iterator[bytes]:
        """The chunks, released so that the bytes completing `size` go out only once verified.

        For a body sent with `Content-Length: size`: a client sees a complete response only when
        the sha256 checked out; on a mismatch the body ends short, which every HTTP client
        reports as a failure (the server has already sent its 200). Two chunks are read now, so
        an object of at most one chunk is verified before this returns, and its mismatch raises
        here, while a proper error can still be answered. Holds at most two chunks in memory.
        """
        first = next(self, None)
        following = next(self, None) if first is not None else None
        if first is None or following is None:  # read to the end already: verified
            return iter([first] if first is not None else [])
        return self._release(first, following, size)

    def _release(self, pending: bytes, following: bytes, size: int) -> Iterator[bytes]:
        """Yield each chunk once the next one has been read, the last once the stream ended
        and its sha256 checked out; a stream longer than `size` stops short of it."""
        sent = 0
        upcoming: bytes | None = following
        with self:
            while upcoming is not None:
                if sent + len(pending) + len(upcoming) > size:
                    raise SizeMismatchError(self.key, size)
                yield pending
                sent += len(pending)
                pending = upcoming
                upcoming = next(self, None)
            yield pending

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

    @abstractmethod
    def check(self) -> None:
        """Raise `ObjectStoreError` saying why when the store cannot be used (readiness): a
        missing key answers like a missing bucket to a HEAD, so probing a key is not enough."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""
        return self.head(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if present (deleting a missing key is not an error)."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3)."""

    def put_directory(
        self, prefix: str, directory: Path, *, skip_existing: bool = False
    ) -> dict[str, ObjectInfo]:
        """Store every file under `directory` at `prefix` + its relative POSIX path; returns
        {relative path: info}. With `skip_existing`, a key already stored is left as it is (a
        content-addressed prefix such as a base's sha256, or a retried checkpoint upload)."""
        stored: dict[str, ObjectInfo] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = path.relative_to(directory).as_posix()
            existing = self.head(prefix + name) if skip_existing else None
            stored[name] = existing or self.put_file(prefix + name, path)
        return stored

    def download_prefix(self, prefix: str, target: Path) -> list[Path]:
        """Write every object under `prefix` into `target` at its key's remainder, each one
        verified and written atomically (`download_to`); returns the paths, [] when nothing is
        stored there."""
        paths = []
        for key in self.list_keys(prefix):
            path = target / key[len(prefix) :]
            self.download_to(key, path)
            paths.append(path)
        return paths

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
