"""Pytest fixtures for object-store tests: a real S3-protocol HTTP server (moto in server mode).

Registered as a plugin (`pytest_plugins = ["tests.s3_server"]` in tests/conftest.py). One moto
server runs per session on 127.0.0.1; every test gets its own bucket, so tests stay isolated
without restarting the server. Credentials are fake and passed to boto3 explicitly, so the
tests never read (or need) the environment's AWS configuration.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control_plane.storage import (
    LocalObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
)

S3_REGION = "us-east-1"
S3_ACCESS_KEY_ID = "testing"
S3_SECRET_ACCESS_KEY = "testing"
S3_PREFIX = "loraforge"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on a free port of 127.0.0.1, stopped after the session.

    This is what `moto.server.ThreadedMotoServer` runs (moto's WSGI app under werkzeug, in a
    background thread), except that requests are served one at a time. moto checks S3
    conditional writes (`If-None-Match: *`) and then writes without a lock, so a threaded
    moto lets several concurrent write-once uploads all succeed; AWS S3 and MinIO decide
    them atomically. Serving requests in turn gives moto the same atomicity, so the
    concurrency tests exercise the store's handling of a real 412 instead of moto's race.
    """
    # Imported here: moto takes seconds to import, and this module is loaded by every test run.
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class OneRequestAtATime(MotoRequestHandler):
        # HTTP/1.0 closes the connection after each response, so the single-threaded server
        # never sits on one client's idle keep-alive connection while others wait.
        protocol_version = "HTTP/1.0"

    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=OneRequestAtATime)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture(scope="session")
def s3_client(moto_server: str) -> Any:
    """A boto3 S3 client for the moto server, built as the platform builds its own."""
    return make_s3_client(
        endpoint_url=moto_server,
        region=S3_REGION,
        access_key_id=S3_ACCESS_KEY_ID,
        secret_access_key=S3_SECRET_ACCESS_KEY,
    )


@pytest.fixture
def s3_store(s3_client: Any) -> Iterator[S3ObjectStore]:
    """An `S3ObjectStore` on a fresh, uniquely named bucket, emptied and removed afterwards."""
    store = S3ObjectStore(s3_client, f"test-{uuid.uuid4().hex[:16]}", S3_PREFIX)
    s3_client.create_bucket(Bucket=store.bucket)
    try:
        yield store
    finally:
        _drop_bucket(s3_client, store.bucket)


def _drop_bucket(client: Any, bucket: str) -> None:
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if objects := [{"Key": item["Key"]} for item in page.get("Contents", [])]:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalObjectStore:
    """A `LocalObjectStore` rooted in the test's temporary directory."""
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture(params=["local", "s3"])
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each test that takes this runs once per implementation."""
    store: ObjectStore = request.getfixturevalue(f"{request.param}_store")
    return store
