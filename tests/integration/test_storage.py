"""The object store's promises, checked against a local directory and a real S3-protocol server.

Tests taking `object_store` run once per implementation (local, s3); the S3 ones talk HTTP to
moto in server mode through boto3 (fixtures in tests/s3_server.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.storage import (
    ChecksumMismatchError,
    LocalObjectStore,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    ObjectTooLargeError,
    S3ObjectStore,
    adapter_version_prefix,
    base_model_prefix,
    checkpoint_prefix,
    file_key,
    make_object_store,
)

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corrupt(store: ObjectStore, key: str) -> bytes:
    """Flip one byte of the stored object behind the store's back; return the new content.

    Local: edit the file in place. S3: overwrite the raw object through boto3, keeping the
    metadata (and so the recorded sha256) the store wrote.
    """
    if isinstance(store, LocalObjectStore):
        path = store.root / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        with path.open("r+b") as f:
            f.write(data)
        return bytes(data)
    assert isinstance(store, S3ObjectStore)
    full = f"{store.prefix}/{key}"
    raw = store.client.get_object(Bucket=store.bucket, Key=full)
    data = bytearray(raw["Body"].read())
    data[len(data) // 2] ^= 0xFF
    store.client.put_object(
        Bucket=store.bucket, Key=full, Body=bytes(data), Metadata=raw["Metadata"]
    )
    return bytes(data)


def leftovers(store: ObjectStore) -> list[str]:
    """Anything a failed write could have left: keys, and for S3 pending multipart uploads,
    for local temp files."""
    found = store.list_keys("")
    if isinstance(store, S3ObjectStore):
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        found += [f"multipart:{u['Key']}" for u in uploads]
    else:
        assert isinstance(store, LocalObjectStore)
        found += [f"tmp:{p.name}" for p in (store.root / ".objectstore" / "tmp").iterdir()]
    return found


class EndlessStream(io.RawIOBase):
    """A stream that never ends: proves `put_stream` stops reading at its limit."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        buffer[:] = b"x" * len(buffer)
        return len(buffer)


# ----------------------------------------------------------------------------- both stores


def test_round_trip(object_store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(MiB + 17)  # more than one read chunk
    key = "tenants/t1/files/f1"

    info = object_store.put_bytes(key, data)

    assert info == ObjectInfo(key=key, size=len(data), sha256=sha(data))
    assert object_store.head(key) == info
    assert object_store.exists(key)
    assert object_store.get_bytes(key, expected_sha256=sha(data)) == data
    with object_store.open_stream(key) as stream:
        chunks = list(stream)
    assert len(chunks) > 1 and b"".join(chunks) == data
    target = tmp_path / "out" / "f1"
    assert object_store.download_to(key, target, expected_sha256=info.sha256) == info
    assert target.read_bytes() == data

    src = tmp_path / "src.bin"
    src.write_bytes(b"from a file")
    assert object_store.put_file("k/file", src, sha256=sha(b"from a file")).size == 11
    assert object_store.put_stream("k/stream", io.BytesIO(b"streamed")).sha256 == sha(b"streamed")
    assert object_store.get_bytes("k/stream") == b"streamed"
    assert object_store.list_keys("") == ["k/file", "k/stream", key]


def test_overwrite_replaces_content_and_checksum(object_store: ObjectStore) -> None:
    object_store.put_bytes("a/b", b"first")
    info = object_store.put_bytes("a/b", b"second, longer")
    assert object_store.head("a/b") == info
    assert object_store.get_bytes("a/b") == b"second, longer"


def test_missing_object(object_store: ObjectStore, tmp_path: Path) -> None:
    assert object_store.head("no/such") is None
    assert not object_store.exists("no/such")
    with pytest.raises(ObjectNotFoundError):
        object_store.get_bytes("no/such")
    with pytest.raises(ObjectNotFoundError):
        object_store.open_stream("no/such")  # raised before any chunk is asked for
    with pytest.raises(ObjectNotFoundError):
        object_store.download_to("no/such", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    object_store.delete("no/such")  # idempotent


def test_put_file_refuses_wrong_sha256(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    with pytest.raises(ChecksumMismatchError) as caught:
        object_store.put_file("k", src, sha256="0" * 64)
    assert (caught.value.expected, caught.value.actual) == ("0" * 64, sha(b"payload"))
    assert leftovers(object_store) == []


def test_reads_verify_stored_sha256(object_store: ObjectStore, tmp_path: Path) -> None:
    key = "tenants/t1/adapters/a/1/adapter_model.safetensors"
    data = os.urandom(64 * 1024)
    object_store.put_bytes(key, data)
    corrupted = corrupt(object_store, key)

    with pytest.raises(ChecksumMismatchError) as caught:
        object_store.get_bytes(key)
    error = caught.value
    assert (error.key, error.expected, error.actual) == (key, sha(data), sha(corrupted))
    assert key in str(error) and sha(data) in str(error) and sha(corrupted) in str(error)

    with pytest.raises(ChecksumMismatchError):
        list(object_store.open_stream(key))

    absent = tmp_path / "dl" / "absent.bin"
    with pytest.raises(ChecksumMismatchError):
        object_store.download_to(key, absent)
    assert not absent.exists()
    present = tmp_path / "dl" / "present.bin"
    present.write_bytes(b"previous version")
    with pytest.raises(ChecksumMismatchError):
        object_store.download_to(key, present)
    assert present.read_bytes() == b"previous version"
    assert sorted(p.name for p in present.parent.iterdir()) == ["present.bin"]  # no temp left


def test_reads_verify_expected_sha256(object_store: ObjectStore, tmp_path: Path) -> None:
    object_store.put_bytes("k", b"content")
    with pytest.raises(ChecksumMismatchError) as caught:
        object_store.get_bytes("k", expected_sha256="f" * 64)
    assert (caught.value.expected, caught.value.actual) == ("f" * 64, sha(b"content"))
    with pytest.raises(ChecksumMismatchError):
        object_store.download_to("k", tmp_path / "k", expected_sha256="f" * 64)
    assert not (tmp_path / "k").exists()


def test_write_once_refuses_second_write(object_store: ObjectStore, tmp_path: Path) -> None:
    object_store.put_bytes("v/1/manifest.json", b"{}", write_once=True)
    src = tmp_path / "other"
    src.write_bytes(b"other")
    with pytest.raises(ObjectExistsError):
        object_store.put_bytes("v/1/manifest.json", b"[]", write_once=True)
    with pytest.raises(ObjectExistsError):
        object_store.put_file("v/1/manifest.json", src, write_once=True)
    with pytest.raises(ObjectExistsError):
        object_store.put_stream("v/1/manifest.json", io.BytesIO(b"x"), write_once=True)
    assert object_store.get_bytes("v/1/manifest.json") == b"{}"


def test_concurrent_write_once_has_one_winner(object_store: ObjectStore) -> None:
    key = "tenants/t1/adapters/a/1/manifest.json"
    writers = 8
    barrier = threading.Barrier(writers)
    results: dict[int, ObjectInfo | BaseException] = {}

    def write(i: int) -> None:
        payload = f"writer {i}".encode() * 1000
        barrier.wait()
        try:
            results[i] = object_store.put_bytes(key, payload, write_once=True)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    winners = {i: r for i, r in results.items() if isinstance(r, ObjectInfo)}
    losers = [r for r in results.values() if not isinstance(r, ObjectInfo)]
    assert len(winners) == 1, results
    assert all(isinstance(r, ObjectExistsError) for r in losers), losers
    [(i, info)] = winners.items()
    assert object_store.get_bytes(key) == f"writer {i}".encode() * 1000
    assert object_store.head(key) == info
    assert leftovers(object_store) == [key]


def test_put_stream_over_limit_leaves_nothing(object_store: ObjectStore) -> None:
    with pytest.raises(ObjectTooLargeError):
        object_store.put_stream(
            "tenants/t1/files/big", io.BufferedReader(EndlessStream()), max_bytes=2 * MiB + 1
        )
    assert leftovers(object_store) == []
    assert object_store.put_stream("exact", io.BytesIO(b"1234"), max_bytes=4).size == 4


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "a\\b",
        "a\x00b",
        "a\nb",
        "",
        "a//b",
        "a/",
        ".",
        "a/./b",
        ".objectstore/tmp/x",
        "x" * 1025,
    ],
)
def test_invalid_keys_refused(
    local_store: LocalObjectStore, s3_client: Any, tmp_path: Path, key: str
) -> None:
    # Keys are validated before any I/O, so the S3 store here needs no bucket.
    for store in (local_store, S3ObjectStore(s3_client, "no-such-bucket", "p")):
        with pytest.raises(ValueError):
            store.put_bytes(key, b"x")
        with pytest.raises(ValueError):
            store.put_stream(key, io.BytesIO(b"x"))
        with pytest.raises(ValueError):
            store.get_bytes(key)
        with pytest.raises(ValueError):
            store.open_stream(key)
        with pytest.raises(ValueError):
            store.head(key)
        with pytest.raises(ValueError):
            store.delete(key)
        with pytest.raises(ValueError):
            store.presigned_url(key)
        with pytest.raises(ValueError):
            store.download_to(key, tmp_path / "dl")
    assert local_store.list_keys("") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["objects"]  # nothing escaped the root


def test_list_and_delete_prefix(object_store: ObjectStore) -> None:
    for key in ["a/1", "a/2", "a/sub/3", "ab/4", "b/5"]:
        object_store.put_bytes(key, key.encode())

    assert object_store.list_keys("a/") == ["a/1", "a/2", "a/sub/3"]
    assert object_store.list_keys("a") == ["a/1", "a/2", "a/sub/3", "ab/4"]
    assert object_store.list_keys("a/s") == ["a/sub/3"]
    assert object_store.list_keys("zzz/") == []

    assert object_store.delete_prefix("a/") == 3
    assert object_store.list_keys("") == ["ab/4", "b/5"]
    assert object_store.head("a/sub/3") is None
    with pytest.raises(ValueError):
        object_store.delete_prefix("")
    object_store.delete("b/5")
    assert object_store.list_keys("") == ["ab/4"]
    if isinstance(object_store, LocalObjectStore):  # emptied directories are pruned
        assert not (object_store.root / "a").exists()
    for bad in ["../", "a/../", "/a", ".objectstore/"]:
        with pytest.raises(ValueError):
            object_store.list_keys(bad)


# ----------------------------------------------------------------------------- local only


def test_local_key_cannot_be_both_object_and_prefix(local_store: LocalObjectStore) -> None:
    local_store.put_bytes("a/b", b"x")
    with pytest.raises(ObjectStoreError):
        local_store.put_bytes("a", b"y")
    with pytest.raises(ObjectStoreError):
        local_store.put_bytes("a/b/c", b"z")
    assert local_store.list_keys("") == ["a/b"]
    assert leftovers(local_store) == ["a/b"]


def test_local_presigned_url_is_none(local_store: LocalObjectStore) -> None:
    local_store.put_bytes("k", b"x")
    assert local_store.presigned_url("k") is None


def test_local_files_are_plain_and_sidecar_loss_is_survivable(
    local_store: LocalObjectStore,
) -> None:
    info = local_store.put_bytes("tenants/t/files/f", b"jsonl lines\n")
    assert (local_store.root / "tenants/t/files/f").read_bytes() == b"jsonl lines\n"
    # A crash between publishing the data and its sidecar: head hashes the file instead.
    (local_store.root / ".objectstore" / "sha256" / "tenants/t/files/f").unlink()
    assert local_store.head("tenants/t/files/f") == info
    assert local_store.get_bytes("tenants/t/files/f", expected_sha256=info.sha256)


# ----------------------------------------------------------------------------- S3 only


def test_s3_object_carries_checksum_and_metadata(s3_store: S3ObjectStore) -> None:
    data = b"adapter bytes"
    s3_store.put_bytes("tenants/t/files/f", data)
    raw = s3_store.client.head_object(
        Bucket=s3_store.bucket, Key="loraforge/tenants/t/files/f", ChecksumMode="ENABLED"
    )
    assert raw["Metadata"] == {"sha256": sha(data)}
    assert raw["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_s3_multipart_upload_above_threshold(s3_store: S3ObjectStore, tmp_path: Path) -> None:
    store = S3ObjectStore(
        s3_store.client,
        s3_store.bucket,
        s3_store.prefix,
        multipart_threshold=MiB,
        part_size=5 * MiB,
        max_concurrency=1,  # the second part waits for the first: the bounded-memory path
    )
    data = os.urandom(5 * MiB + 123)
    src = tmp_path / "weights.safetensors"
    src.write_bytes(data)

    info = store.put_file("base-models/x/weights.safetensors", src, sha256=sha(data))

    raw = store.client.head_object(
        Bucket=store.bucket, Key="loraforge/base-models/x/weights.safetensors"
    )
    assert raw["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB + the rest
    assert store.head("base-models/x/weights.safetensors") == info
    assert store.get_bytes("base-models/x/weights.safetensors", expected_sha256=sha(data)) == data
    assert leftovers(store) == ["base-models/x/weights.safetensors"]


def test_s3_multipart_write_once_loser_leaves_no_upload(
    s3_store: S3ObjectStore, tmp_path: Path
) -> None:
    store = S3ObjectStore(
        s3_store.client,
        s3_store.bucket,
        s3_store.prefix,
        multipart_threshold=MiB,
        part_size=5 * MiB,
    )
    src = tmp_path / "big"
    src.write_bytes(os.urandom(5 * MiB + 1))
    results: list[object] = []
    barrier = threading.Barrier(2)

    def write() -> None:
        barrier.wait()
        try:
            results.append(store.put_file("k", src, write_once=True))
        except ObjectExistsError as exc:
            results.append(exc)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, ObjectInfo) for r in results) == 1, results
    assert sum(isinstance(r, ObjectExistsError) for r in results) == 1, results
    assert leftovers(store) == ["k"]


def test_s3_presigned_url_fetchable(s3_store: S3ObjectStore) -> None:
    s3_store.put_bytes("tenants/t/adapters/a/1/adapter_config.json", b'{"r": 8}')
    url = s3_store.presigned_url("tenants/t/adapters/a/1/adapter_config.json", expires_s=60)
    assert url is not None
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b'{"r": 8}'


def test_s3_keys_live_under_prefix(s3_store: S3ObjectStore) -> None:
    s3_store.put_bytes("a/b", b"x")
    raw = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)
    assert [o["Key"] for o in raw["Contents"]] == ["loraforge/a/b"]


def test_locations_name_the_object_where_it_lies(
    s3_store: S3ObjectStore, local_store: LocalObjectStore
) -> None:
    s3_store.put_bytes("a/b", b"x")
    assert s3_store.location("a/b") == f"s3://{s3_store.bucket}/loraforge/a/b"
    assert s3_store.location("a/") == f"s3://{s3_store.bucket}/loraforge/a/"
    local_store.put_bytes("a/b", b"x")
    assert Path(local_store.location("a/b").removeprefix("file://")).read_bytes() == b"x"
    assert local_store.location("a/").endswith("/a/")
    for store in (s3_store, local_store):
        with pytest.raises(ValueError):
            store.location("../escape")


def test_s3_head_of_foreign_object_uses_its_checksum(s3_store: S3ObjectStore) -> None:
    s3_store.client.put_object(
        Bucket=s3_store.bucket, Key="loraforge/foreign", Body=b"hello", ChecksumAlgorithm="SHA256"
    )
    assert s3_store.head("foreign") == ObjectInfo("foreign", 5, sha(b"hello"))


def test_factory(moto_server: str, tmp_path: Path) -> None:
    s3 = make_object_store(
        local_root=tmp_path,
        s3_endpoint_url=moto_server,
        s3_bucket="factory-test",
        s3_prefix="lf",
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    assert isinstance(s3, S3ObjectStore)
    s3.ensure_bucket()
    s3.ensure_bucket()  # idempotent
    s3.put_bytes("k", b"v")
    assert s3.get_bytes("k") == b"v"
    s3.delete("k")
    s3.client.delete_bucket(Bucket="factory-test")

    local = make_object_store(
        local_root=tmp_path / "objects",
        s3_endpoint_url=None,
        s3_bucket=None,
        s3_prefix="lf",
        s3_region=None,
        s3_access_key_id=None,
        s3_secret_access_key=None,
    )
    assert isinstance(local, LocalObjectStore)
    with pytest.raises(ValueError):
        make_object_store(
            local_root=None,
            s3_endpoint_url=None,
            s3_bucket=None,
            s3_prefix="",
            s3_region=None,
            s3_access_key_id=None,
            s3_secret_access_key=None,
        )


# ----------------------------------------------------------------------------- key layout


def test_key_layout_matches_design() -> None:
    digest = "ab" * 32
    assert file_key("t1", "file-9") == "tenants/t1/files/file-9"
    assert adapter_version_prefix("t1", "support-bot", 3) == "tenants/t1/adapters/support-bot/3/"
    assert checkpoint_prefix("t1", "job-7", 200) == "tenants/t1/jobs/job-7/checkpoints/200/"
    assert base_model_prefix(digest) == f"base-models/{digest}/"


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: file_key("t/1", "f"),
        lambda: file_key("..", "f"),
        lambda: adapter_version_prefix("t", "a/b", 1),
        lambda: checkpoint_prefix("t", "j", -1),
        lambda: base_model_prefix("XYZ"),
    ],
)
def test_key_layout_refuses_bad_parts(make_key: Any) -> None:
    with pytest.raises(ValueError):
        make_key()


def test_s3_failures_reach_callers_as_object_store_errors(s3_store: S3ObjectStore) -> None:
    """Outside `storage/` nothing handles botocore: a bucket that is gone surfaces as an
    `ObjectStoreUnavailableError`, for writes, listings, reads and deletes alike."""
    gone = S3ObjectStore(s3_store.client, "no-such-bucket")
    for attempt in (
        lambda: gone.put_bytes("a/b.txt", b"x"),
        lambda: gone.list_keys("a/"),
        lambda: gone.get_bytes("a/b.txt"),
        lambda: gone.delete_prefix("a/"),
    ):
        with pytest.raises(ObjectStoreUnavailableError) as caught:
            attempt()
        assert isinstance(caught.value, ObjectStoreError)
        assert "NoSuchBucket" in str(caught.value) or "bucket" in str(caught.value).lower()


def test_check_says_why_a_store_cannot_be_used(
    local_store: LocalObjectStore, s3_store: S3ObjectStore, tmp_path: Path
) -> None:
    """Readiness asks `check()`: a missing bucket must not pass for a missing key."""
    local_store.check()
    s3_store.check()

    gone = S3ObjectStore(s3_store.client, "no-such-bucket-here", "p")
    assert gone.head("some/key") is None  # what a key probe would have taken for "ok"
    with pytest.raises(ObjectStoreUnavailableError, match="'no-such-bucket-here' does not exist"):
        gone.check()

    moved = LocalObjectStore(tmp_path / "store")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(ObjectStoreUnavailableError, match="missing or not writable"):
        moved.check()
