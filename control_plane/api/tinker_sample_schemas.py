"""The body of the Tinker SDK's `asample` (`routes/tinker.py`): a SampleRequest, written here
from the SDK's wire shape (0.38) as the other bodies are in `tinker_schemas.py`, and apart from
them because its checks read its prompt: `target_prompt_logprobs` must have one row per prompt
token after the first (`control_plane.prompt_targets`). What the API cannot know (a token id
past the base's vocabulary, a prompt past its context) the engine refuses as the call's user
error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from control_plane.api.numbers import WholeNumber
from control_plane.api.tinker_schemas import Id, ModelInput, Tensor, _Body
from control_plane.interactive import MAX_TOPK_LOGPROBS
from control_plane.prompt_targets import layout_problem

# How many top-k logprobs, or alternative tokens, a sample returns a position; 0 returns none.
TopkWidth = Annotated[WholeNumber, Field(ge=0, le=MAX_TOPK_LOGPROBS)]


class SamplingParams(_Body):
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    # What a torch generator takes: 0 to 2**64 - 1 (the SDK's protobuf seed is a uint64).
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_k: int = Field(default=-1, ge=-1)
    top_p: float = Field(default=1.0, gt=0, le=1)


class Sample(_Body):
    type: Literal["sample"] = "sample"
    sampling_session_id: Id
    seq_id: int | None = Field(default=None, ge=0)
    num_samples: int = Field(default=1, ge=1, le=128)
    prompt: ModelInput
    sampling_params: SamplingParams
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: int | None = Field(default=None, ge=1)
    topk_prompt_logprobs: TopkWidth = 0
    topk_sample_logprobs: TopkWidth = 0
    target_prompt_logprobs: Tensor | None = None
    prompt_alt_tokens_k: TopkWidth = 0
    record_stability_info: Literal[False] | None = None

    @field_validator("target_prompt_logprobs")
    @classmethod
    def _targets_fit_the_prompt(cls, targets: Tensor | None, info: ValidationInfo) -> Any:
        prompt = info.data.get("prompt")  # absent when the prompt itself was refused
        if targets is not None and prompt is not None:
            problem = layout_problem(targets.model_dump(), len(prompt.tokens()) - 1)
            if problem is not None:
                raise PydanticCustomError(
                    "target_prompt_logprobs", "{problem}", {"problem": problem}
                )
        return targets
