"""A real PEFT LoRA directory on the tiny test base, made once per session: what a trainer
publishes, for tests of the registry and of the API around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.testbase import TEST_BASE_PATH


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA directory on the tiny test base, with non-zero weights (so that it
    visibly changes the model's output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("peft-adapter")
    get_peft_model(base, config).save_pretrained(out)
    return out
