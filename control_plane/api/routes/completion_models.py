"""The bodies of `POST /v1/completions` (`completions`): OpenAI's legacy completion request, as
far as it is offered, and its answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control_plane.api.routes.chat_models import (
    MAX_TOKENS,
    ChatUsage,
    StreamOptions,
    sampling_params,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for a completion
MAX_PROMPTS = 32  # prompts one request may batch (each is a call of its own)
MAX_STOPS = 16

Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="a base or `adapter@version`")
    prompt: (
        Text
        | TokenIds
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="text, token ids, or a batch of either (a choice set each)")
    max_tokens: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS, description="16 unless sent; 0 with `echo`"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1, description="0: greedy")
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's: -1 or 0, every token")
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    # Up to 16, not OpenAI's 4: lm-evaluation-harness sends a task's stops and the base's end.
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)]
        | None
    ) = None
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="each token's logprob and its likeliest tokens"
    )
    echo: bool | None = Field(default=None, description="the prompt first, with its logprobs")
    stream: bool | None = Field(
        default=None, description="the text sent as it is sampled, as server-sent events"
    )
    stream_options: StreamOptions | None = Field(default=None, description="with `stream`")
    ignore_eos: bool | None = Field(
        default=None,
        description="vLLM's: every token up to the limit, past the base's end of sequence",
    )
    # OpenAI's (and vLLM's) fields for what is not offered, taken at the values that ask for
    # nothing (vLLM's benchmark client sends `repetition_penalty` 1).
    repetition_penalty: Literal[1] | None = Field(default=None, description="not offered")
    suffix: None = Field(default=None, description="not offered")
    best_of: Literal[1] | None = Field(default=None, description="not offered beyond 1")
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = Field(
        default=None, description="not offered"
    )
    frequency_penalty: Literal[0] | None = Field(default=None, description="not offered")
    presence_penalty: Literal[0] | None = Field(default=None, description="not offered")
    user: str | None = Field(default=None, max_length=256, description="taken, not used")

    def prompts(self) -> list[dict[str, Any]]:
        """Each prompt as the executor takes it: text, or token ids."""
        prompt = self.prompt
        batch: list[Any] = (
            [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        )
        return [{"text": one} if isinstance(one, str) else {"tokens": list(one)} for one in batch]

    def sample_requests(self) -> list[dict[str, Any]]:
        """The executor's completion calls, one a prompt: the prompt and SamplingParams of a
        sample, and what its answer gives (`echo`, `logprobs`)."""
        limit = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        # max_tokens 0: one token sampled, and left out
        params = sampling_params(max(limit, 1), self.temperature, self.top_p, self.seed, self.stop)
        if self.top_k:  # 0 and -1 narrow nothing, as vLLM takes them
            params["top_k"] = self.top_k
        return [
            {
                "completion": {
                    **prompt,
                    "echo": bool(self.echo),
                    "logprobs": self.logprobs,
                    "max_tokens": limit,
                },
                "num_samples": self.n,
                "sampling_params": params,
                **({"stream": True} if self.stream else {}),
                **({"ignore_eos": True} if self.ignore_eos else {}),
            }
            for prompt in self.prompts()
        ]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[CompletionChoice]
    usage: ChatUsage
