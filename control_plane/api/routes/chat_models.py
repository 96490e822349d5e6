"""The bodies of `POST /v1/chat/completions` (`chat`): OpenAI's chat completion request, as
far as it is offered, and its answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 4096


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


# What a reply's message carries back when a client appends it to its messages (the SDK's
# `messages.append(reply.choices[0].message)`): taken while it asks for nothing.
Nothing = Annotated[list[Any], Field(max_length=0)] | None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64, description="taken, not used")
    refusal: None = None
    tool_calls: Nothing = None
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = Field(default=None, description="taken, not used")

    def plain(self) -> dict[str, str]:
        """The message as a chat template takes it: a developer's as a system message, text
        parts joined."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool | None = Field(default=None, description="a last chunk with `usage`")
    include_obfuscation: bool | None = Field(default=None, description="taken, not used")


class ChatCompletionCreate(_Body):
    model: str = Field(min_length=1, max_length=200, description="a base or `adapter@version`")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS, deprecated=True)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1, description="0: greedy")
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
        | None
    ) = None
    stream: bool | None = Field(
        default=None, description="the reply as server-sent events, as it is sampled"
    )
    stream_options: StreamOptions | None = Field(default=None, description="with `stream`")
    logprobs: bool | None = Field(
        default=None,
        description="each token of the reply's text with its logprob (streamed with its text)",
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="with `logprobs`: each token's likeliest tokens"
    )
    ignore_eos: bool | None = Field(
        default=None,
        description=(
            "vLLM's: every token up to the limit, past the base's end of turn and of sequence"
        ),
    )
    # OpenAI's (and vLLM's) fields for what is not offered, taken at the values that ask for
    # nothing.
    frequency_penalty: Literal[0] | None = Field(default=None, description="not offered")
    presence_penalty: Literal[0] | None = Field(default=None, description="not offered")
    repetition_penalty: Literal[1] | None = Field(default=None, description="not offered")
    parallel_tool_calls: bool | None = Field(default=None, description="taken, not used")
    user: str | None = Field(default=None, max_length=256, description="taken, not used")

    def sample_request(self) -> dict[str, Any]:
        """The executor's chat call: the messages and SamplingParams of a sample."""
        limit = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        params = sampling_params(limit, self.temperature, self.top_p, self.seed, self.stop)
        messages = [m.plain() for m in self.messages]
        asked: dict[str, Any] = {
            "messages": messages,
            "num_samples": self.n,
            "sampling_params": params,
        }
        if self.logprobs:
            asked["logprobs"] = True
            if self.top_logprobs:
                asked["topk_sample_logprobs"] = self.top_logprobs
        if self.ignore_eos:
            asked["ignore_eos"] = True
        return {**asked, "stream": True} if self.stream else asked


def sampling_params(
    limit: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    """A sample's SamplingParams from OpenAI's fields (a chat's, a completion's)."""
    params: dict[str, Any] = {"max_tokens": limit}
    if temperature is not None:
        params["temperature"] = temperature
    if top_p == 0:  # nothing but the likeliest token: greedy
        params["temperature"] = 0.0
    elif top_p is not None:
        params["top_p"] = top_p
    if seed is not None:  # a torch generator's seed: 0 to 2**64 - 1
        params["seed"] = seed % 2**64
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    return params


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: None = None
