"""OpenAI's legacy completions (`POST /v1/completions`) through the official `openai` SDK, on the
real interactive executor holding the tiny test base: a fine-tuned adapter completes text as its
Tinker sampler samples the same tokens, with the same logprobs; lm-evaluation-harness's
loglikelihood request (token ids, `echo`, `logprobs` 1) scores a prompt as the sampler's
`compute_logprobs` does; batches of prompts come back prompt by prompt; stop strings are left
out; what is not offered is refused by name and nothing asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from tinker import types
from transformers import AutoTokenizer

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import (
    openai_client,
    publish_adapter_version,
    sdk_service,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPT = "The sky over the harbour was"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())


def _last_usage(services: Services) -> Any:
    """What the call finished last was metered."""
    with services.engine.connect() as conn:
        return conn.execute(
            text("SELECT usage FROM interactive_calls ORDER BY finished_at DESC NULLS LAST LIMIT 1")
        ).scalar_one()


def _parse_logprobs(choice: Any, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's reading of a loglikelihood answer (`openai_completions.py`'s
    `parse_logprobs`): the continuation's logprobs summed, and whether each of its tokens was
    its position's likeliest."""
    logprobs = choice.logprobs.token_logprobs[ctxlen:-1]
    tops = choice.logprobs.top_logprobs[ctxlen:-1]
    return sum(logprobs), all(
        lp == max(top.values()) for lp, top in zip(logprobs, tops, strict=True)
    )


def test_the_openai_sdk_completes_text_with_an_adapter_as_its_sampler_samples_it(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    prompt = tokenizer.encode(PROMPT)
    client = openai_client(live_url, tenant_a.member)
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(model_path=f"tinker://adapters/{model}").result(
            timeout=120
        )
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0)
        sampled = sampler.sample(types.ModelInput.from_ints(prompt), 1, greedy).result(120)
        scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result(120)
    [sequence] = sampled.sequences

    reply = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    assert reply.object == "text_completion" and reply.model == model
    [choice] = reply.choices
    assert choice.text == tokenizer.decode(sequence.tokens, skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(sequence.tokens) == 8 else "stop")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        len(prompt),
        len(sequence.tokens),
    )
    # Metered as a chat is: the prompt's tokens and those sampled.
    assert _last_usage(services) == {
        "prefill_tokens": len(prompt),
        "sampled_tokens": len(sequence.tokens),
    }
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens == [tokenizer.decode([t]) for t in sequence.tokens]
    assert logprobs.token_logprobs == pytest.approx(sequence.logprobs, abs=1e-4)
    offsets = [sum(len(t) for t in logprobs.tokens[:k]) for k in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs or [], strict=True
    ):  # greedy: each token its position's likeliest, among two and itself
        assert top is not None and 1 <= len(top) <= 3 and top[token] == logprob
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)

    # lm-evaluation-harness's loglikelihood: context and continuation as token ids, echoed,
    # one token sampled and ignored; each prompt token's logprob the sampler's own.
    ctxlen = 4
    scoring = client.completions.create(
        model=model, prompt=[prompt], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    [scored_choice] = scoring.choices
    assert scored_choice.logprobs is not None
    token_logprobs = scored_choice.logprobs.token_logprobs
    assert len(token_logprobs) == len(prompt) + 1 and token_logprobs[0] is None
    assert token_logprobs[1 : len(prompt)] == pytest.approx(scored[1:], abs=1e-4)
    assert token_logprobs[-1] == pytest.approx(sequence.logprobs[0], abs=1e-4)
    assert scored_choice.text.startswith(tokenizer.decode(prompt))
    total, greedy_all = _parse_logprobs(scored_choice, ctxlen)
    assert total == pytest.approx(sum(scored[ctxlen:]), abs=1e-3)
    assert isinstance(greedy_all, bool)
    assert scored_choice.logprobs.top_logprobs[0] is None

    # max_tokens 0 with echo: the prompt scored, nothing sampled nor metered.
    only = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True
    )
    [only_choice] = only.choices
    assert only_choice.text == PROMPT and only_choice.finish_reason == "length"
    assert only_choice.logprobs is not None
    assert only_choice.logprobs.token_logprobs[1:] == pytest.approx(scored[1:], abs=1e-4)
    assert only.usage is not None and only.usage.completion_tokens == 0
    assert _last_usage(services) == {"prefill_tokens": len(prompt), "sampled_tokens": 0}

    # A stop string is left out of the text, and the tokens after the one it ends in; a task's
    # stops and the base's end, as lm-evaluation-harness sends them, are more than OpenAI's 4.
    stop = next(
        choice.text[k : k + 2] for k in range(2, len(choice.text) - 1) if choice.text[k].strip()
    )
    stopped = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stop=[stop, "\n\nQuestion", "Question:", "</s>", "<|endoftext|>"],
        logprobs=0,
    ).choices[0]
    assert stopped.text == choice.text[: choice.text.index(stop)]
    assert stopped.finish_reason == "stop" and stopped.logprobs is not None
    joined = "".join(stopped.logprobs.tokens)
    last = stopped.logprobs.tokens[-1]
    assert joined.startswith(stopped.text) and len(joined) - len(last) < len(stopped.text or "x")


def test_a_batch_of_prompts_is_answered_prompt_by_prompt_each_as_alone(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    seeded: dict[str, Any] = {"model": executor, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    prompts = [PROMPT, "Once upon a time"]
    both = client.completions.create(prompt=prompts, n=2, **seeded)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(prompt=p, n=2, **seeded).choices for p in prompts]
    assert [c.text for c in both.choices] == [c.text for c in alone[0] + alone[1]]
    assert len({c.text for c in both.choices}) > 1
    assert both.usage is not None and both.usage.prompt_tokens == sum(
        len(AutoTokenizer.from_pretrained(TEST_BASE_PATH).encode(p)) for p in prompts
    )


def test_what_a_completion_does_not_offer_is_refused_by_name_and_nothing_asked(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    before = _calls(services)
    for extra, param in (
        ({"suffix": "!"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"max_tokens": 0}, "max_tokens"),  # samples nothing, and echoes nothing
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ["a"] * 33}, "prompt"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ):
        sent = httpx.post(
            f"{live_url}/v1/completions",
            json={"model": executor, "prompt": PROMPT, **extra},
            headers=tenant_a.headers("member"),
        )
        assert sent.status_code == 400, (extra, sent.text)
        assert sent.json()["error"]["param"].startswith(param), sent.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt=PROMPT)
    with pytest.raises(openai.PermissionDeniedError):  # a reader
        openai_client(live_url, tenant_a.reader).completions.create(model=executor, prompt=PROMPT)
    assert _calls(services) == before
    # The executor's own refusal (a prompt longer than the base's context) is a 400 with its
    # words, a batch's other prompts withdrawn or let go.
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=executor, prompt=[PROMPT, "word " * 5000, PROMPT])
    with services.engine.connect() as conn:
        refused = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'failed' AND payload_dropped_at IS NULL) "
                "FROM interactive_calls"
            )
        ).one()
    assert tuple(refused) == (0, 0)  # none waits for an executor; the refused one let go
