"""A tiny Llama-architecture base model that ships with loraforge for tests and CI.

It loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` like any
checkpoint, has a ChatML chat template, and is small enough (about 150k parameters) that a whole
LoRA job on it takes a fraction of a second. `build.py` regenerates it deterministically.
"""

from pathlib import Path

TEST_BASE_PATH: Path = Path(__file__).resolve().parent / "model"

__all__ = ["TEST_BASE_PATH"]
