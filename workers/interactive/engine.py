"""The interactive engine: many tenants' LoRA models trained call by call on one resident base.

Each Tinker "training client" is a named adapter in ONE peft model wrapped around the resident
base (never a copy of it): a call activates its model's adapter, runs, and leaves the others
untouched, since an inactive adapter takes no part in a forward pass and so gets no gradient.
Several models' calls run together (`forward_many`, `sample_many`): each row of the shared
batch goes through its own model's adapter, and each model gets its own gradient.
Each model has its own AdamW (Tinker's AdamParams: torch's AdamW with per-step hyperparameters),
and its gradients accumulate over forward_backward calls until its optim_step. Adapter weights
and optimizer state are fp32 whatever the base's precision, which runs in bf16 under autocast
where it is resident in bf16, as in the batch recipe. When the last model is dropped the adapter
layers are unloaded and the base is bit-identical to before (`ResidentBase.state_fingerprint`).

While it holds any model the engine owns the base's adapter slots: a batch job's
`attached_adapter` must not run on the same resident base at the same time.

Files are PEFT directories (`adapters`): `export_adapter` in bf16 for serving, `save_state` in
fp32 with the optimizer beside it, so that a resumed model takes the very steps the original
would have.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from workers.interactive.adam import AdamParams, read_adam_params
from workers.interactive.adapters import AdaptableLayers, load_adapter_weights, write_adapter_dir
from workers.interactive.chat import (
    StreamSink,
    chat_prompt,
    chat_request,
    end_of_turn_tokens,
    is_chat,
    is_completion,
)
from workers.interactive.completion import completion_prompt
from workers.interactive.custom_input import read_custom_input
from workers.interactive.forwarding import Forward, run_together
from workers.interactive.losses import InteractiveError, Loss, read_forward_input
from workers.interactive.routing import BASE
from workers.interactive.sample_requests import read_sample_request
from workers.interactive.sample_run import More, OnAnswer, Read, SampleRun
from workers.training.checkpointing import staged
from workers.training.resident import ResidentBase

__all__ = ["InteractiveEngine", "InteractiveError"]

OPTIMIZER_STATE = "optimizer_state.pt"
# Most (padded) tokens in one forward pass; a call's datums run in groups of at most this many,
# so activations and logits are bounded by it, not by the size of the call.
MICRO_BATCH_TOKENS = 8192


@dataclass
class _Model:
    """A model's adapter (by its peft name: model ids may hold characters a module name can't)
    and, for a training model, its optimizer; a sampler loaded for `sample` alone has none."""

    adapter: str
    params: list[nn.Parameter]
    optimizer: torch.optim.AdamW | None
    steps: int = 0


class InteractiveEngine:
    """Tinker's training and sampling calls over named adapters on one resident base."""

    def __init__(self, base: ResidentBase, *, micro_batch_tokens: int = MICRO_BATCH_TOKENS) -> None:
        self.base = base
        self.micro_batch_tokens = micro_batch_tokens
        self._lock = threading.RLock()
        self._peft: PeftModel | None = None
        self._models: dict[str, _Model] = {}
        self._adapter_names = (f"adapter_{i}" for i in itertools.count())
        model = base.model
        self._vocab_size: int = model.get_input_embeddings().num_embeddings
        self._context_length: int = model.config.max_position_embeddings
        eos = [base.tokenizer.eos_token_id, model.generation_config.eos_token_id]
        flat = [e for item in eos for e in (item if isinstance(item, list) else [item])]
        self._eos_token_ids = frozenset(e for e in flat if e is not None)
        # Where a chat (`chat`) ends: the end of sequence, and the template's end of turn.
        self._chat_stops = self._eos_token_ids | end_of_turn_tokens(base.tokenizer)
        self._layers = AdaptableLayers.of(model)
        # Where a streamed chat's text so far goes while it samples (the runner writes it to
        # its call), and how often: a chat asked with `stream` naming its key (the call's id).
        self.stream_to: StreamSink | None = None
        self.stream_every_seconds = 0.25

    # -- models --------------------------------------------------------------------------------

    def create(
        self,
        model_id: str,
        *,
        rank: int,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
    ) -> None:
        """A fresh LoRA model (B = 0, so it starts as the base) with a fresh optimizer."""
        with self._lock:
            if model_id in self._models:
                raise InteractiveError(f"model {model_id!r} exists already")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise InteractiveError(f"seed must be an integer or null, got {seed!r}")
            config = self._layers.lora_config(
                rank, mlp=train_mlp, attn=train_attn, unembed=train_unembed
            )
            with _seeded(seed, self.base.device):
                adapter = self._attach(config)
            self._models[model_id] = self._model(adapter, trainable=True)

    def loaded(self) -> list[str]:
        """The models loaded, training models and samplers."""
        with self._lock:
            return list(self._models)

    def has(self, model_id: str) -> bool:
        """Whether `model_id` is loaded, as a training model or as a sampler."""
        with self._lock:
            return model_id in self._models

    def drop(self, model_id: str) -> None:
        """Free a model's adapter and optimizer state; the base is untouched."""
        with self._lock:
            self._remove(self._get(model_id).adapter)
            del self._models[model_id]

    def _attach(self, config: LoraConfig) -> str:
        """Add an adapter to the peft model (wrapping the base on the first); its peft name."""
        adapter = next(self._adapter_names)
        if self._peft is None:
            # autocast_adapter_dtype (peft's default): fp32 adapter weights on a bf16 base.
            self._peft = get_peft_model(self.base.model, config, adapter_name=adapter)
        else:
            self._peft.add_adapter(adapter, config)
        return adapter

    def _model(self, adapter: str, *, trainable: bool) -> _Model:
        marker = f".{adapter}."
        params = [p for n, p in self._wrapped.named_parameters() if marker in n]
        if not trainable:
            return _Model(adapter, params, None)
        optimizer = torch.optim.AdamW(
            params,
            lr=AdamParams.learning_rate,
            betas=(AdamParams.beta1, AdamParams.beta2),
            eps=AdamParams.eps,
            weight_decay=AdamParams.weight_decay,
            fused=self.base.device.type in ("cpu", "cuda"),  # one kernel for all tensors
        )
        return _Model(adapter, params, optimizer)

    def _remove(self, adapter: str) -> None:
        """Delete an adapter; the last one takes the peft wrapping with it."""
        peft = self._wrapped
        others = [a for a in peft.peft_config if a != adapter]
        if others:
            if peft.active_adapter == adapter:
                peft.set_adapter(others[0])  # peft would do so too, with a warning
            peft.delete_adapter(adapter)
            return
        peft.unload()
        self._peft = None
        base_model = self.base.model
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in base_model.__dict__:
                delattr(base_model, attribute)
        base_model.requires_grad_(False)
        base_model.eval()

    @property
    def _wrapped(self) -> PeftModel:
        """The peft model; there is one whenever a model is loaded."""
        assert self._peft is not None
        return self._peft

    def _get(self, model_id: str) -> _Model:
        model = self._models.get(model_id)
        if model is None:
            raise InteractiveError(f"unknown model {model_id!r}: create or load it first")
        return model

    def _trainable(self, model_id: str) -> tuple[_Model, torch.optim.AdamW]:
        model = self._get(model_id)
        if model.optimizer is None:
            raise InteractiveError(f"model {model_id!r} was loaded for sampling only")
        return model, model.optimizer

    # -- training ------------------------------------------------------------------------------

    def forward_backward(self, model_id: str, fwd_input: dict[str, Any]) -> dict[str, Any]:
        """ForwardBackwardInput -> ForwardBackwardOutput; gradients accumulate until optim_step."""
        return _raised(self.forward_many([(model_id, fwd_input, True)])[0])

    def forward(self, model_id: str, fwd_input: dict[str, Any]) -> dict[str, Any]:
        """The same output as forward_backward, without gradients."""
        return _raised(self.forward_many([(model_id, fwd_input, False)])[0])

    def forward_many(
        self, asked: list[tuple[str, dict[str, Any], bool]]
    ) -> list[dict[str, Any] | InteractiveError]:
        """ForwardBackwardInputs of training models (a model's calls in their order, no
        optim_step between them), each with whether its gradients are kept (forward_backward) or
        not (forward), run together (`forwarding`: their datums
        share each forward pass, each row through its own model's adapter): each its
        ForwardBackwardOutput, as it would be alone, or the reason it was refused (the others
        run). A batch that fails leaves every model's gradients as they were."""
        answers: list[dict[str, Any] | InteractiveError] = []
        parsed: dict[int, Forward] = {}
        with self._lock:
            for i, (model_id, fwd_input, backward) in enumerate(asked):
                try:
                    model, _ = self._trainable(model_id)
                    loss_fn: Loss
                    if fwd_input.get("loss_fn") == "custom":
                        loss_fn, data = read_custom_input(fwd_input, self._vocab_size)
                    else:
                        loss_fn, data = read_forward_input(fwd_input, self._vocab_size)
                except InteractiveError as refused:
                    answers.append(refused)
                    continue
                parsed[i] = Forward(model.adapter, model.params, loss_fn, data, backward)
                answers.append({})
            if parsed:
                results = run_together(
                    self._wrapped,
                    list(parsed.values()),
                    device=self.base.device,
                    autocast=self._autocast,
                    micro_batch_tokens=self.micro_batch_tokens,
                )
                for i, result in zip(parsed, results, strict=True):
                    answers[i] = result
        return answers

    def optim_step(self, model_id: str, adam_params: dict[str, Any]) -> dict[str, Any]:
        """One AdamW step on the gradients accumulated since the last; OptimStepResponse."""
        with self._lock:
            model, optimizer = self._trainable(model_id)
            hp = read_adam_params(adam_params)
            for group in optimizer.param_groups:
                group["lr"] = hp.learning_rate
                group["betas"] = (hp.beta1, hp.beta2)
                group["eps"] = hp.eps
                group["weight_decay"] = hp.weight_decay
            grads = [p.grad for p in model.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if hp.grad_clip_norm > 0 and grads:
                torch.nn.utils.clip_grads_with_norm_(model.params, hp.grad_clip_norm, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.steps += 1
            return {"metrics": {"grad_norm:mean": float(norm)}}

    # -- files ---------------------------------------------------------------------------------

    def export_adapter(self, model_id: str, directory: Path, *, base_name: str) -> None:
        """A PEFT directory a server loads unchanged (vLLM's --lora-modules): bf16 weights."""
        with self._lock:
            adapter = self._get(model_id).adapter
            with staged(Path(directory)) as staging:
                write_adapter_dir(self._wrapped, adapter, staging, base_name, torch.bfloat16)

    def save_state(self, model_id: str, directory: Path, *, base_name: str) -> None:
        """The adapter in fp32 and the optimizer state and step count beside it: `load_state`
        resumes it exactly."""
        with self._lock:
            model, optimizer = self._trainable(model_id)
            with staged(Path(directory)) as staging:
                write_adapter_dir(self._wrapped, model.adapter, staging, base_name, None)
                state = {"optimizer": optimizer.state_dict(), "steps": model.steps}
                torch.save(state, staging / OPTIMIZER_STATE)

    def load_state(self, model_id: str, directory: Path, *, with_optimizer: bool) -> None:
        """(Re)create `model_id` from a save_state or export_adapter directory; its optimizer
        state too when asked and saved there, else a fresh optimizer."""
        directory = Path(directory)
        with self._lock:
            model = self._load(directory, trainable=True)
            state_path = directory / OPTIMIZER_STATE
            if with_optimizer and state_path.is_file():
                assert model.optimizer is not None
                state = torch.load(state_path, map_location="cpu", weights_only=True)
                try:
                    model.optimizer.load_state_dict(state["optimizer"])
                except (KeyError, ValueError) as error:
                    self._remove(model.adapter)
                    raise InteractiveError(
                        f"the saved optimizer state does not fit: {error}"
                    ) from None
                model.steps = int(state["steps"])
            self._replace(model_id, model)

    def load_sampler(self, sampler_id: str, directory: Path) -> None:
        """An exported adapter loaded for `sample(sampler_id, ...)` only (no optimizer)."""
        with self._lock:
            self._replace(sampler_id, self._load(Path(directory), trainable=False))

    def _replace(self, model_id: str, model: _Model) -> None:
        old = self._models.get(model_id)
        self._models[model_id] = model
        if old is not None:
            self._remove(old.adapter)

    def _load(self, directory: Path, *, trainable: bool) -> _Model:
        """An adapter from a PEFT directory, refused with the reason unless its weights fit."""
        adapter = self._attach(self._layers.read_config(directory))
        try:
            load_adapter_weights(self._wrapped, adapter, directory, self.base.device)
        except BaseException:
            self._remove(adapter)
            raise
        return self._model(adapter, trainable=trainable)

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, model_id: str | None, request: dict[str, Any]) -> dict[str, Any]:
        """SampleRequest -> SampleResponse from a model, a sampler, or (None) the base alone."""
        return _raised(self.sample_many([(model_id, request)])[0])

    def sample_many(
        self,
        asked: list[tuple[str | None, dict[str, Any]]],
        on_answer: OnAnswer | None = None,
        more: More | None = None,
    ) -> list[dict[str, Any] | InteractiveError]:
        """SampleRequests, each of its model (None: the base alone), decoded together in
        batches within SAMPLE_TOKENS (a request past it runs alone, as one reaching past
        where the base's rope couples rows: `sample_batching`), each row
        through its own model's adapter in the same forward pass (peft's mixed batches): each
        its SampleResponse, or the reason it was refused (the others run). `on_answer` is
        given each one (by its index in `asked`) as soon as it is known: a refusal before any
        decoding, a response once its rows are done while the batch's longer rows go on.
        `more`, between the passes of the last batch, offers requests that may join it
        (`generate`'s `join`; `SampleRun` says when one fits): each one added (refused, or with
        room in the batch) is asked after the others, answered as they are and returned after
        them."""
        with self._lock:
            # With no adapter at all there is no peft model: the base alone answers.
            model = self.base.model if self._peft is None else self._peft
            return SampleRun(
                self._read_request,
                model,
                self._peft is not None,
                self.base.tokenizer,
                self.base.device,
                self._autocast,
                (self.stream_to, self.stream_every_seconds),
                on_answer,
            ).run(asked, more)

    def _read_request(self, model_id: str | None, request: dict[str, Any]) -> Read:
        """A request of a model (None: the base alone) read against the base: its adapter, the
        request, and whether it was asked as text (a chat or a completion); or the reason it is
        refused."""
        try:
            adapter = BASE if model_id is None else self._get(model_id).adapter
            chat, completion = is_chat(request), is_completion(request)
            if chat:
                request = chat_prompt(request, self.base.tokenizer)
            elif completion:
                request = completion_prompt(request, self.base.tokenizer)
            read = read_sample_request(
                request, self._vocab_size, self._context_length, self._eos_token_ids
            )
        except InteractiveError as refused:
            return refused
        if (chat or completion) and request.get("ignore_eos") is True:
            # vLLM's `ignore_eos`: every token up to the limit (load generators ask it, for
            # replies of a known length); stop strings still end it.
            read = replace(read, stop_tokens=frozenset())
        elif chat or completion:  # both end at the end of sequence, whatever stop strings
            read = chat_request(read, self._chat_stops if chat else self._eos_token_ids)
        return adapter, read, chat or completion

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.base.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.base.device.type, dtype=torch.bfloat16)


def _raised(answer: dict[str, Any] | InteractiveError) -> dict[str, Any]:
    if isinstance(answer, InteractiveError):
        raise answer
    return answer


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the adapter's initialisation without disturbing the process's random state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
