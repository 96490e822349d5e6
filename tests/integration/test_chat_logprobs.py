"""A chat's `logprobs` through the official `openai` SDK, on the real interactive executor holding
the tiny test base: each token of the reply's content with the logprob a Tinker sampler of the
same model returns for it, its bytes (joined, the content) and its likeliest alternatives; a
stop string's tokens are left out with the text; a chat asked without them has none."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinker import types
from transformers import AutoTokenizer

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import (
    CHAT_MESSAGES,
    openai_client,
    publish_adapter_version,
    sdk_service,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def test_a_chats_logprobs_are_its_samplers_token_by_token(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    prompt = tokenizer.apply_chat_template(
        CHAT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    client = openai_client(live_url, tenant_a.member)
    asked = {"model": model, "messages": CHAT_MESSAGES, "max_completion_tokens": 10}
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(model_path=f"tinker://adapters/{model}").result(
            timeout=120
        )
        greedy = types.SamplingParams(max_tokens=10, temperature=0.0)
        answer = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result(timeout=120)
    [sequence] = answer.sequences
    reply = client.chat.completions.create(**asked, temperature=0, logprobs=True, top_logprobs=3)
    [choice] = reply.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    # One entry a token of the content, each the sampler's logprob of the same token.
    assert len(content) == len(sequence.tokens) == 10
    assert [entry.token for entry in content] == [tokenizer.decode([t]) for t in sequence.tokens]
    assert [entry.logprob for entry in content] == pytest.approx(sequence.logprobs, abs=1e-4)
    assert b"".join(bytes(entry.bytes or []) for entry in content).decode() == (
        choice.message.content
    )
    for entry in content:  # greedy: the token is its likeliest, the others after it
        assert len(entry.top_logprobs) == 3
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == pytest.approx(
            (entry.token, entry.logprob), abs=1e-4
        )
        assert [top.logprob for top in entry.top_logprobs] == sorted(
            (top.logprob for top in entry.top_logprobs), reverse=True
        )

    # A stop string is left out of the content, and its tokens out of the logprobs.
    text = choice.message.content or ""
    stop = next(text[k : k + 2] for k in range(3, len(text) - 1) if text[k].strip())
    stopped = client.chat.completions.create(**asked, temperature=0, logprobs=True, stop=[stop])
    [cut] = stopped.choices
    assert cut.message.content == text[: text.index(stop)]
    assert cut.logprobs is not None and cut.logprobs.content is not None
    kept = cut.logprobs.content
    assert 0 < len(kept) < len(content) and all(not entry.top_logprobs for entry in kept)
    joined = "".join(entry.token for entry in kept)
    assert joined.startswith(cut.message.content) and len(joined) - len(kept[-1].token) < len(
        cut.message.content or "x"
    )  # the last entry is the token the text ends in
    assert [entry.logprob for entry in kept] == pytest.approx(
        sequence.logprobs[: len(kept)], abs=1e-4
    )

    # Not asked: none, as OpenAI leaves them.
    plain = client.chat.completions.create(**asked, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content
