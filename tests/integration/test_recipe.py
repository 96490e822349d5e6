"""The training recipe on the shipped tiny Llama: real transformers + peft, a few steps per job."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from control_plane.hyperparameters import Hyperparameters
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.kernels.fused_lora import fused_lora_layers
from workers.kernels.fused_norm import RMSNormFunction, fused_rms_norms
from workers.kernels.packing import (
    EXPLICIT_ATTENTION_MAX_TOKENS,
    PACKED_ATTENTION,
    ExplicitCausalAttention,
    LinearCrossEntropy,
    attention_kernel,
    causal_attention,
    pack,
    packed_hidden_states,
)
from workers.training.device import bf16_supported
from workers.training.formatting import TokenizedExample, tokenize_records
from workers.training.recipe import (
    LoraRecipe,
    ResidentBase,
    TrainHooks,
    TrainingError,
    TrainResult,
    train_adapter,
)

# What `precision="auto"` resolves to here (bf16 where the CPU multiplies bf16), and the other.
MACHINE_PRECISION = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"
OTHER_PRECISION = "fp32" if MACHINE_PRECISION == "bf16" else "bf16"

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Peru": "Lima",
}
RECORDS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}."},
        ]
    }
    for country, city in CAPITALS.items()
] + [{"prompt": f"{a} plus {a}?", "completion": f"{2 * a}"} for a in range(4)]
HP = Hyperparameters(
    n_epochs=2,
    batch_size=4,
    learning_rate_multiplier=10,
    lora_rank=8,
    max_seq_length=64,
    checkpoint_every_steps=2,
    warmup_ratio=0.1,
)  # 12 examples: 3 steps per epoch, 6 steps


@dataclass
class Recorder:
    """TrainHooks that keep every event and a copy of every checkpoint."""

    root: Path
    stop_after_polls: int | None = None
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    checkpoints: dict[int, Path] = field(default_factory=dict)
    polls: int = 0

    def hooks(self) -> TrainHooks:
        return TrainHooks(self.on_event, self.should_stop, self.on_checkpoint)

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after_polls is not None and self.polls > self.stop_after_polls

    def on_checkpoint(self, step: int, directory: Path) -> None:
        self.checkpoints[step] = shutil.copytree(directory, self.root / f"uploaded-{step}")

    def metrics(self, key: str) -> list[dict[str, Any]]:
        return [data for kind, _, data in self.events if kind == "metrics" and key in data]


@dataclass
class Run:
    result: TrainResult
    recorder: Recorder


@pytest.fixture(scope="module")
def base() -> Iterator[ResidentBase]:
    # One thread: the test base's matrices are tiny, so threads only add synchronisation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ResidentBase.load(TEST_BASE_PATH)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pristine(base: ResidentBase) -> dict[str, Any]:
    """The base as loaded: fingerprint and module tree."""
    return {"fingerprint": base.state_fingerprint(), "modules": module_tree(base)}


@pytest.fixture(scope="module")
def reference(base: ResidentBase, pristine: dict[str, Any], tmp_path_factory) -> Run:
    """One uninterrupted job that several tests inspect."""
    root = tmp_path_factory.mktemp("reference")
    recorder = Recorder(root)
    result = train_adapter(base, RECORDS, None, HP, recorder.hooks(), root / "job")
    return Run(result, recorder)


def module_tree(base: ResidentBase) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in base.model.named_modules()]


def assert_base_restored(base: ResidentBase, pristine: dict[str, Any]) -> None:
    assert base.state_fingerprint() == pristine["fingerprint"]
    assert module_tree(base) == pristine["modules"]
    assert not any(isinstance(m, BaseTunerLayer) for m in base.model.modules())
    assert not hasattr(base.model, "peft_config")
    assert not any(p.requires_grad for p in base.model.parameters())
    assert not base.model.training
    assert not base.model.is_activation_checkpointing
    assert not base.model.get_input_embeddings()._forward_hooks
    assert base.model.config._attn_implementation == "sdpa"


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "adapter_model.safetensors", "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118


def assert_same_adapter(left: Path, right: Path) -> None:
    a, b = adapter_tensors(left), adapter_tensors(right)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_loss_falls_and_metrics_are_reported(reference: Run):
    result, recorder = reference.result, reference.recorder
    assert (result.global_step, result.total_steps, result.stopped) == (6, 6, False)
    assert result.precision == MACHINE_PRECISION
    steps = recorder.metrics("train_loss")
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    first_epoch = sum(m["train_loss"] for m in steps[:3]) / 3
    second_epoch = sum(m["train_loss"] for m in steps[3:]) / 3
    assert second_epoch < first_epoch - 0.1
    assert result.final_train_loss == steps[-1]["train_loss"]
    assert result.trained_tokens == sum(m["tokens"] for m in steps)
    for metric in steps:
        assert metric["tokens_per_s"] > 0 and metric["peak_memory_mib"] > 0
        assert metric["learning_rate"] >= 0 and metric["eta_s"] >= 0
    assert steps[-1]["fraction_done"] == 1.0 and steps[-1]["epoch"] == 2.0
    assert {m["total_steps"] for m in steps} == {6}
    assert any(f"precision {MACHINE_PRECISION}" in m for _, m, _ in recorder.events)
    assert sorted(recorder.checkpoints) == [2, 3, 4, 6]  # every 2 steps and each epoch's end


def test_adapter_is_a_bf16_peft_directory_that_changes_outputs(reference: Run):
    adapter_dir = reference.result.adapter_dir
    assert adapter_dir is not None
    assert sorted(p.name for p in adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == str(TEST_BASE_PATH)
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    tensors = adapter_tensors(adapter_dir)
    assert len(tensors) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for key, tensor in tensors.items():
        assert key.startswith("base_model.model.model.layers.")
        assert key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert tensor.dtype == torch.bfloat16

    plain = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    ids = torch.tensor([[5, 17, 99, 250, 3, 42]])
    with torch.no_grad():
        before = plain(ids).logits
        tuned = PeftModel.from_pretrained(plain, adapter_dir)
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_base_is_bit_identical_after_jobs_and_seed_reproduces_the_adapter(
    base: ResidentBase, pristine: dict[str, Any], reference: Run, tmp_path
):
    assert_base_restored(base, pristine)
    loads = ResidentBase.load_count
    again = train_adapter(base, RECORDS, None, HP, TrainHooks(), tmp_path / "again")
    assert ResidentBase.load_count == loads
    assert_base_restored(base, pristine)
    assert again.adapter_dir is not None and reference.result.adapter_dir is not None
    assert_same_adapter(again.adapter_dir, reference.result.adapter_dir)

    other_seed = train_adapter(
        base, RECORDS, None, HP.model_copy(update={"seed": 7}), TrainHooks(), tmp_path / "seed7"
    )
    assert other_seed.adapter_dir is not None
    with pytest.raises(AssertionError):
        assert_same_adapter(other_seed.adapter_dir, reference.result.adapter_dir)


def test_resumed_run_ends_at_the_uninterrupted_adapter(
    base: ResidentBase, pristine: dict[str, Any], reference: Run, tmp_path
):
    mid_run = reference.recorder.checkpoints[2]
    recorder = Recorder(tmp_path)
    resumed = train_adapter(
        base, RECORDS, None, HP, recorder.hooks(), tmp_path / "job", resume_dir=mid_run
    )
    resume_events = [d for _, _, d in recorder.events if "resumed_from_step" in d]
    assert resume_events == [{"resumed_from_step": 2}]
    assert [m["step"] for m in recorder.metrics("train_loss")] == [3, 4, 5, 6]
    assert resumed.global_step == 6 and resumed.trained_tokens == reference.result.trained_tokens
    assert resumed.adapter_dir is not None and reference.result.adapter_dir is not None
    assert_same_adapter(resumed.adapter_dir, reference.result.adapter_dir)
    assert_base_restored(base, pristine)


def test_resume_refuses_a_checkpoint_of_other_data(base: ResidentBase, reference: Run, tmp_path):
    with pytest.raises(TrainingError, match="different data"):
        train_adapter(
            base,
            RECORDS[:-1],
            None,
            HP,
            TrainHooks(),
            tmp_path,
            resume_dir=reference.recorder.checkpoints[2],
        )


@pytest.mark.parametrize(("polls", "expected_step"), [(2, 1), (1, 0)])
def test_should_stop_ends_the_job_within_one_step(
    base: ResidentBase, pristine: dict[str, Any], tmp_path, polls: int, expected_step: int
):
    """Polled before each of the 2 micro-batches of a step: the stop lands at the next poll."""
    recorder = Recorder(tmp_path, stop_after_polls=polls)
    hp = HP.model_copy(update={"gradient_accumulation_steps": 2})
    result = train_adapter(base, RECORDS, None, hp, recorder.hooks(), tmp_path / "job")
    assert result.stopped and result.adapter_dir is None
    assert result.global_step == expected_step
    assert len(recorder.metrics("train_loss")) == expected_step
    assert not (tmp_path / "job" / "adapter").exists()
    assert_base_restored(base, pristine)


@pytest.mark.parametrize(
    ("update", "records", "reason"),
    [
        ({"target_modules": ["qkv_proj"]}, RECORDS, r"target module\(s\) \['qkv_proj'\] not found"),
        ({"lora_rank": 48}, RECORDS, r"lora_rank 48 is larger than .*k_proj \(64x32\)"),
        ({}, [{"messages": [{"role": "user", "content": "hello?"}]}] * 3, "no training example"),
        ({"max_seq_length": 16}, [{"prompt": "word " * 40, "completion": "x"}], "no training"),
        ({"precision": OTHER_PRECISION}, RECORDS, f"resident in {MACHINE_PRECISION}"),
    ],
)
def test_jobs_that_cannot_train_are_refused_with_a_reason(
    base: ResidentBase, pristine: dict[str, Any], tmp_path, update, records, reason
):
    with pytest.raises(TrainingError, match=reason):
        train_adapter(base, records, None, HP.model_copy(update=update), TrainHooks(), tmp_path)
    assert_base_restored(base, pristine)


def test_eval_dora_rslora_checkpointing_and_accumulation(
    base: ResidentBase, pristine: dict[str, Any], tmp_path
):
    hp = HP.model_copy(
        update={
            "eval_fraction": 0.25,
            "eval_every_steps": 2,
            "use_dora": True,
            "use_rslora": True,
            "gradient_checkpointing": True,
            "gradient_accumulation_steps": 3,
            "target_modules": ["q_proj", "v_proj"],
        }
    )
    recorder = Recorder(tmp_path)
    result = train_adapter(base, RECORDS, None, hp, recorder.hooks(), tmp_path / "job")
    # 12 examples, 3 held out: 9 train, 3 steps per epoch, 6 steps; eval at 2, 4 and the end.
    assert result.total_steps == 6
    assert [m["step"] for m in recorder.metrics("eval_loss")] == [2, 4, 6]
    assert result.final_eval_loss == recorder.metrics("eval_loss")[-1]["eval_loss"]
    assert result.adapter_dir is not None
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert_base_restored(base, pristine)
    plain = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    PeftModel.from_pretrained(plain, result.adapter_dir)


@pytest.mark.parametrize("split_by", ["accumulation", "row_tokens"])
def test_splitting_a_step_does_not_change_the_update(
    base: ResidentBase, tmp_path, monkeypatch, split_by
):
    """The loss is a mean over every trained token of the step, however the step is split: into
    gradient-accumulation micro-batches, or into packed rows of at most TRAIN_ROW_TOKENS."""
    hp = HP.model_copy(update={"n_epochs": 1})
    whole = train_adapter(base, RECORDS, None, hp, TrainHooks(), tmp_path / "whole")
    rows: list[int] = []
    loss_sum = LoraRecipe._loss_sum

    def counting_loss_sum(recipe: LoraRecipe, examples: list[TokenizedExample]) -> torch.Tensor:
        rows.append(sum(len(e) for e in examples))
        return loss_sum(recipe, examples)

    monkeypatch.setattr(LoraRecipe, "_loss_sum", counting_loss_sum)
    update: dict[str, Any] = {}
    if split_by == "accumulation":
        update["gradient_accumulation_steps"] = 4
    else:
        monkeypatch.setattr("workers.training.recipe.TRAIN_ROW_TOKENS", 40)
    split = train_adapter(
        base, RECORDS, None, hp.model_copy(update=update), TrainHooks(), tmp_path / "split"
    )
    steps = whole.total_steps
    assert len(rows) >= 2 * steps  # every step ran as several forward/backward passes
    if split_by == "row_tokens":
        longest = max(len(e) for e in tokenize_records(RECORDS, base.tokenizer, 512).examples)
        assert max(rows) <= max(40, longest)
    assert whole.adapter_dir is not None and split.adapter_dir is not None
    a, b = adapter_tensors(whole.adapter_dir), adapter_tensors(split.adapter_dir)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0.05, atol=2e-3)


def test_chunked_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr("workers.kernels.packing.LOGITS_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (30,))
    loss = LinearCrossEntropy.apply(hidden, weight, targets)
    (loss * 0.5).backward()
    reference = hidden.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(reference @ weight.T, targets, reduction="sum")
    (expected * 0.5).backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_packed_row_attends_within_each_example_only(base: ResidentBase):
    examples = [
        TokenizedExample(tuple(range(10, 30)), (-100,) * 20),
        TokenizedExample(tuple(range(40, 47)), (-100,) * 7),
    ]
    row = pack(examples, base.device)
    backbone = base.model.get_decoder()
    with torch.no_grad():
        base.model.set_attn_implementation(PACKED_ATTENTION)
        try:
            packed = packed_hidden_states(backbone, row)
        finally:
            base.model.set_attn_implementation("sdpa")
        separate = torch.cat(
            [backbone(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0] for e in examples]
        )
    torch.testing.assert_close(packed.float(), separate.float(), rtol=0.02, atol=0.02)


def _lora_gradients(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernel", ["sdpa", "explicit"])
def test_fused_lora_and_packed_attention_match_peft_on_separate_examples(kernel):
    """The training kernels (fused LoRA layers, packed attention split per example through either
    attention kernel, chunked cross-entropy) give peft's loss and LoRA gradients on a float64
    model, so only a bug shows."""
    model = AutoModelForCausalLM.from_pretrained(
        TEST_BASE_PATH, dtype=torch.float64, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    examples = [
        TokenizedExample(tuple(range(10, 30)), (-100,) * 8 + tuple(range(30, 42))),
        TokenizedExample(tuple(range(40, 47)), (-100,) * 3 + tuple(range(50, 54))),
        TokenizedExample(tuple(range(5, 18)), (-100,) * 2 + tuple(range(60, 71))),
    ]
    expected = torch.zeros((), dtype=torch.float64)
    # the norms in float64 on both sides (transformers' compute in float32: see the norm's test)
    with fused_rms_norms(peft_model):
        for example in examples:
            logits = peft_model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            expected = expected + F.cross_entropy(
                logits, labels, reduction="sum", ignore_index=-100
            )
    expected.backward()
    reference = _lora_gradients(peft_model)
    peft_model.zero_grad(set_to_none=True)

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    model.set_attn_implementation(PACKED_ATTENTION)
    with (
        fused_lora_layers(peft_model) as fused,
        fused_rms_norms(peft_model),
        attention_kernel(kernel),
    ):
        assert fused == len(layers) > 0
        row = pack(examples, torch.device("cpu"))
        hidden = packed_hidden_states(model.get_decoder(), row)[row.target_positions]
        loss = LinearCrossEntropy.apply(hidden, model.get_output_embeddings().weight, row.targets)
        loss.backward()
    model.set_attn_implementation("sdpa")
    assert all("forward" not in m.__dict__ for m in layers)  # peft's own forward is back
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    gradients = _lora_gradients(peft_model)
    assert gradients.keys() == reference.keys() and len(gradients) == 2 * len(layers)
    for name, gradient in gradients.items():
        torch.testing.assert_close(
            gradient, reference[name], rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )


def _norm_and_gradients(
    norm: Any, x: torch.Tensor, grad: torch.Tensor, fused: bool
) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    norm.weight.grad = None
    out = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon) if fused else norm(x)
    out.backward(grad)
    return out.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_transformers(dtype):
    """Same output bit for bit as transformers' LlamaRMSNorm (both compute in float32), the same
    gradients for the input and a trainable weight up to float32 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(2, 7, 48, dtype=dtype) * 3 + 0.5
    grad = torch.randn(2, 7, 48, dtype=dtype)
    out, grad_x, grad_weight = _norm_and_gradients(norm, x, grad, fused=True)
    ref_out, ref_grad_x, ref_grad_weight = _norm_and_gradients(norm, x, grad, fused=False)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(grad_x, ref_grad_x, **tolerance)
    torch.testing.assert_close(grad_weight, ref_grad_weight, **tolerance)


def test_fused_rms_norm_gradients_are_exact_in_float64():
    """Against autograd through the formula itself, in float64: only a wrong derivative shows."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-6), (x, weight))
    expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMSNormFunction.apply(x, weight, 1e-6), expected)


def test_fused_rms_norms_take_llama_style_norms_only():
    """Norms whose forward is Llama's are fused (and restored on exit); Gemma's `1 + weight`
    norm keeps its own forward."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    model = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=torch.float32)
    model.extra = nn.ModuleList([Qwen2RMSNorm(8), GemmaRMSNorm(8)])
    norms = [m for m in model.modules() if m.__class__.__name__.endswith("RMSNorm")]
    with fused_rms_norms(model) as fused:
        patched = [m for m in norms if "forward" in m.__dict__]
        assert fused == len(patched) == 2 * model.config.num_hidden_layers + 2
        assert model.extra[0] in patched and model.extra[1] not in patched
        x = torch.randn(1, 4, 8)
        torch.testing.assert_close(model.extra[0](x), Qwen2RMSNorm.forward(model.extra[0], x))
    assert all("forward" not in m.__dict__ for m in norms)


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_explicit_attention_matches_sdpa_with_gradients(heads, kv_heads):
    """Grouped-query and plain causal attention: output and all three input gradients as sdpa's
    (float64, to rounding), and within bf16 rounding when run in bf16."""
    torch.manual_seed(0)
    shapes = [(1, heads, 29, 16), (1, kv_heads, 29, 16), (1, kv_heads, 29, 16)]
    inputs = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    grad_output = torch.randn(1, heads, 29, 16, dtype=torch.float64)

    def run(kernel, dtype):
        leaves = [x.detach().to(dtype, copy=True).requires_grad_() for x in inputs]
        if kernel == "explicit":
            out = ExplicitCausalAttention.apply(*leaves, 0.25)
        else:
            out = F.scaled_dot_product_attention(
                *leaves, is_causal=True, scale=0.25, enable_gqa=heads != kv_heads
            )
        out.backward(grad_output.to(dtype))
        return [out.detach().double(), *(x.grad.double() for x in leaves)]

    reference = run("sdpa", torch.float64)
    for mine, expected in zip(run("explicit", torch.float64), reference, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12)
    for mine, expected in zip(run("explicit", torch.bfloat16), reference, strict=True):
        assert ((mine - expected).norm() / expected.norm()).item() < 2e-2


def test_auto_attention_is_explicit_for_short_bf16_cpu_examples_only(monkeypatch):
    calls = []
    original = ExplicitCausalAttention.apply
    monkeypatch.setattr(
        ExplicitCausalAttention, "apply", lambda *a: calls.append(a[0].shape) or original(*a)
    )
    for tokens, dtype in [(40, torch.bfloat16), (40, torch.float32)]:
        q, k, v = (torch.randn(1, 2, tokens, 8, dtype=dtype) for _ in range(3))
        causal_attention(q, k, v, None, 0.0)
    long = EXPLICIT_ATTENTION_MAX_TOKENS + 1
    q, k, v = (torch.randn(1, 2, long, 8, dtype=torch.bfloat16) for _ in range(3))
    causal_attention(q, k, v, None, 0.0)
    assert calls == [torch.Size([1, 2, 40, 8])]


def test_fused_lora_under_bf16_autocast_matches_peft():
    """The path bf16 machines train on (bf16 base, fp32 LoRA weights, bf16 autocast): the fused
    layer computes in bf16 as peft's separate matmuls do, and gives fp32 gradients."""
    model = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=torch.bfloat16)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    ids = torch.tensor([list(range(10, 40))])

    def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        peft_model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = peft_model(input_ids=ids).logits[0, :-1].float()
        loss = F.cross_entropy(logits, ids[0, 1:])
        loss.backward()
        return loss.detach(), _lora_gradients(peft_model)

    expected, reference = loss_and_gradients()
    with fused_lora_layers(peft_model):
        loss, gradients = loss_and_gradients()
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    assert gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        assert gradient.dtype == torch.float32
        cosine = F.cosine_similarity(gradient.flatten(), reference[name].flatten(), dim=0)
        assert cosine > 0.99, name


def _rank_main(rank: int, world_size: int, port: int, output_dir: str) -> None:
    """One rank of a gloo process group, as Ray Train's TorchTrainer would set it up."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        base = ResidentBase.load(TEST_BASE_PATH)
        hp = HP.model_copy(update={"num_gpus": world_size})
        result = train_adapter(
            base, RECORDS, None, hp, TrainHooks(), Path(output_dir) / f"rank{rank}"
        )
        assert result.global_step == 6 and not result.stopped
        assert (result.adapter_dir is not None) == (rank == 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_make_the_single_process_update(reference: Run, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2)
    assert reference.result.adapter_dir is not None
    single = adapter_tensors(reference.result.adapter_dir)
    ranked = adapter_tensors(tmp_path / "rank0" / "adapter")
    assert not (tmp_path / "rank1" / "adapter").exists()
    for key, tensor in single.items():
        torch.testing.assert_close(ranked[key].float(), tensor.float(), rtol=0.05, atol=2e-3)
