"""Base-model plumbing: checkpoint identity, admission checks, GGUF import and the local disk cache.

A base model is a directory in the Hugging Face layout (`config.json`, `*.safetensors`, tokenizer
files). Its identity is the sha256 of its weight files, so the same weights fetched from S3, a
local path or a GGUF import are one cache entry, and lineage can name exactly what an adapter was
trained on. Workers only admit causal language models: anything else is refused with a reason a
user can act on, before a GPU is tied up.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import struct
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# transformers resolves its names lazily, and two threads resolving them at once (two base
# imports in celery's thread pool) can get a bogus ImportError: they are imported under this lock.
_TRANSFORMERS_IMPORT = threading.Lock()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class BaseModelError(Exception):
    """A directory or file is not a base model loraforge can train on; the message says why."""


@dataclass(frozen=True)
class BaseModelInfo:
    """What the registry records about an admitted base checkpoint."""

    architecture: str
    parameter_count: int
    has_chat_template: bool
    sha256: str
    dtype: str


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's `*.safetensors` files, sorted by name."""
    return sorted(model_dir.glob("*.safetensors"), key=lambda p: p.name)


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files (name, then bytes, in name order): the checkpoint's identity."""
    files = weight_files(model_dir)
    if not files:
        raise BaseModelError(f"{model_dir} holds no *.safetensors weight files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def inspect_model_dir(path: Path) -> BaseModelInfo:
    """Describe a checkpoint directory, refusing anything that is not a trainable causal LM."""
    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(f"{path} is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BaseModelError(f"{path} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{config_path} is not valid JSON: {exc}") from exc
    architecture = _causal_lm_architecture(config, path)
    if not weight_files(path):
        raise BaseModelError(f"{path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise BaseModelError(
            f"{path} has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    parameter_count, dtype = _count_parameters(path)
    return BaseModelInfo(
        architecture=architecture,
        parameter_count=parameter_count,
        has_chat_template=_has_chat_template(path),
        sha256=weights_sha256(path),
        dtype=dtype,
    )


def _causal_lm_architecture(config: dict[str, object], path: Path) -> str:
    """The config's architecture if transformers knows it as a causal LM."""
    with _TRANSFORMERS_IMPORT:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise BaseModelError(f"{path}/config.json names no architecture")
    architecture = str(architectures[0])
    if not architecture.endswith("ForCausalLM"):
        raise BaseModelError(
            f"{path} is a {architecture}, not a causal language model (*ForCausalLM): "
            "LoRA fine-tuning here trains text generators only"
        )
    if architecture not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise BaseModelError(
            f"{architecture} is not a causal LM this transformers version supports"
        )
    return architecture


def _count_parameters(path: Path) -> tuple[int, str]:
    """Parameter count and majority dtype, read from the safetensors headers (no tensor loaded)."""
    total = 0
    by_dtype: Counter[str] = Counter()
    for file in weight_files(path):
        for name, entry in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for size in entry["shape"]:
                count *= int(size)
            total += count
            by_dtype[str(entry["dtype"])] += count
    if not total:
        raise BaseModelError(f"{path} weight files hold no tensors")
    dtype = by_dtype.most_common(1)[0][0]
    return total, _SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def _safetensors_header(file: Path) -> dict[str, dict[str, list[int] | str]]:
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise BaseModelError(f"{file} is not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise BaseModelError(f"{file} is not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise BaseModelError(f"{file} is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise BaseModelError(f"{file} is not a safetensors file")
    return header


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        with contextlib.suppress(ValueError):
            return bool(json.loads(tokenizer_config.read_text()).get("chat_template"))
    return False


def import_gguf(gguf_path: Path, out_dir: Path, progress: bool = False) -> BaseModelInfo:
    """Dequantize a GGUF file once into a bf16 safetensors checkpoint (with its tokenizer).

    Transformers can load GGUF directly, but such a model is flagged as quantized and every load
    pays the dequantization again; a plain bf16 checkpoint trains and loads like any other. The
    directory appears atomically: it is written next to `out_dir` and renamed into place.
    """
    with _TRANSFORMERS_IMPORT:
        import torch
        from tqdm.auto import tqdm
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    with gguf_path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise BaseModelError(f"{gguf_path} is not a GGUF file (bad magic number)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=3, desc=f"import {gguf_path.name}", unit="stage", disable=not progress)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "checkpoint"
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=torch.bfloat16,
                # Unpack every block now, into plain dense weights: what gets saved.
                quantization_config=GgufConfig(dequantize=True),
            )
        except (ValueError, KeyError, RuntimeError) as exc:
            raise BaseModelError(f"{gguf_path} cannot be loaded as a causal LM: {exc}") from exc
        bar.update()
        if getattr(model, "hf_quantizer", None) is not None or model.is_quantized:
            raise BaseModelError(f"{gguf_path} did not dequantize into plain weights")
        model.save_pretrained(staged)
        # The chat template goes into tokenizer_config.json, which every transformers reads.
        tokenizer.save_pretrained(staged, save_jinja_files=False)
        del model
        bar.update()
        info = inspect_model_dir(staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
        bar.update()
    bar.close()
    return info


class BaseCache:
    """Base checkpoints on local disk under `root/<sha256>/`, verified on every `get`.

    Rehashing on each `get` costs well under a second for a small base and catches silent
    corruption (a flipped byte) that a size/mtime memo would miss; a corrupted or missing entry
    is refetched. A file lock per entry keeps concurrent workers from fetching it twice.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        """Where the entry for `sha256` lives (whether or not it is there)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BaseModelError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256

    def get(self, sha256: str, fetch: Callable[[Path], None]) -> Path:
        """A verified checkpoint dir for `sha256`; `fetch(dir)` fills an empty dir when needed."""
        entry = self.path_for(sha256)
        with self._locked(sha256):
            if entry.is_dir() and _matches(entry, sha256):
                return entry
            if entry.exists():
                shutil.rmtree(entry)
            staged = self.root / f".fetch-{sha256[:16]}-{uuid.uuid4().hex[:8]}"
            staged.mkdir()
            try:
                fetch(staged)
                if not _matches(staged, sha256):
                    raise BaseModelError(
                        f"fetched base model does not match its sha256 {sha256}: "
                        "the source is corrupted or registered with the wrong checksum"
                    )
                staged.rename(entry)
            finally:
                if staged.exists():
                    shutil.rmtree(staged)
        return entry

    @contextlib.contextmanager
    def _locked(self, sha256: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".{sha256}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _matches(model_dir: Path, sha256: str) -> bool:
    try:
        return weights_sha256(model_dir) == sha256
    except BaseModelError:
        return False
