"""The training step's compute: packed rows and per-example attention, the output head and loss
in chunks, fused LoRA layers and RMSNorms. Each module states its math and its measured gain;
an exactness test stands beside each (tests/integration/test_recipe.py)."""
