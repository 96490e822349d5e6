"""`LocalObjectStore`: the embedded default, a directory with sha256 sidecars."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from control_plane.storage.interface import (
    CHUNK_SIZE,
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
from control_plane.storage.keys import RESERVED_TOP_LEVEL, validate_key, validate_prefix

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
        self._internal = self.root / RESERVED_TOP_LEVEL
        self._tmp = self._internal / "tmp"
        self._sidecars = self._internal / "sha256"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._sidecars.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        if not self._tmp.is_dir() or not os.access(self._tmp, os.W_OK):
            raise ObjectStoreUnavailableError(f"{self.root} is missing or not writable")

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
                size, digest = copy_hashing(src, tmp, key=key, max_bytes=max_bytes)
                verify(key, digest, expected)
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
            size, sha = hash_file(path)
            return ObjectInfo(key=key, size=size, sha256=sha)
        return ObjectInfo(key=key, size=stat.st_size, sha256=sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        validate_prefix(prefix)
        directory = self.root / prefix.rpartition("/")[0]
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(directory):
            if Path(dirpath) == self.root and RESERVED_TOP_LEVEL in dirnames:
                dirnames.remove(RESERVED_TOP_LEVEL)
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
