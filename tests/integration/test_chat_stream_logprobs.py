"""A chat streamed with `logprobs` (`stream: true`, `logprobs: true`) through the official `openai`
SDK: on the real interactive executor each chunk carries the entries of the tokens whose text
it adds, and the entries of every chunk are exactly those the same chat answers whole; with the
test in the executor's place, each write appends only its new entries to those the call stores
(`interactive_calls.progress`), a write from 0 (the call decoded again) takes their place, and
the stream reads and sends each entry once (`interactive.retrieve_past`)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from control_plane import interactive
from control_plane import interactive_calls as calls
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.faults.tcp_proxy import CuttableProxy
from tests.tinker_harness import (
    CHAT_MESSAGES,
    PlayedExecutor,
    openai_client,
    publish_adapter_version,
    tinker_settings,
)
from workers.interactive import streaming
from workers.interactive.chat import SoFar
from workers.interactive.streaming import StreamWriter

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The executor writes a streamed chat's reply so far after every token.
    return tinker_settings(tmp_path).model_copy(update={"chat_stream_every_seconds": 0.0})


def _by_choice(chunks: list[Any]) -> dict[int, list[tuple[str, list[Any]]]]:
    """Each choice's chunks that carry content or entries: (its content, its entries)."""
    choices: dict[int, list[tuple[str, list[Any]]]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            entries = choice.logprobs.content if choice.logprobs is not None else None
            if choice.delta.content or entries:
                choices.setdefault(choice.index, []).append(
                    (choice.delta.content or "", list(entries or []))
                )
    return choices


def _same_entries(streamed: list[Any], whole: list[Any]) -> None:
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-4)
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [
        [t.token for t in e.top_logprobs] for e in whole
    ]


@pytest.mark.usefixtures("paced")
def test_a_chat_streamed_with_logprobs_sends_each_tokens_entry_with_the_text_it_adds(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    asked: dict[str, Any] = {
        "model": model,
        "messages": CHAT_MESSAGES,
        "temperature": 0,
        "max_completion_tokens": 24,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**asked)
    [answer] = whole.choices
    assert answer.logprobs is not None and answer.logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **asked))
    [pieces] = _by_choice(chunks).values()
    # Sent as it was sampled: several chunks, each its delta's tokens, their texts its content.
    assert len(pieces) >= 3, pieces
    for content, entries in pieces[:-1]:
        assert entries and "".join(e.token for e in entries) == content
    assert "".join(content for content, _ in pieces) == answer.message.content
    _same_entries([e for _, entries in pieces for e in entries], answer.logprobs.content)
    finishes = [ch for c in chunks for ch in c.choices if ch.finish_reason]
    assert [ch.finish_reason for ch in finishes] == [answer.finish_reason]

    # A stop string: never sent, nor the entries past the token the text ends in.
    content = answer.message.content or ""
    stop = next(content[k : k + 2] for k in range(3, len(content) - 1) if content[k].strip())
    stopped = client.chat.completions.create(stop=[stop], **asked).choices[0]
    assert stopped.logprobs is not None and stopped.logprobs.content
    [cut_pieces] = _by_choice(
        list(client.chat.completions.create(stream=True, stop=[stop], **asked))
    ).values()
    assert "".join(content for content, _ in cut_pieces) == stopped.message.content
    _same_entries([e for _, entries in cut_pieces for e in entries], stopped.logprobs.content)

    # Several choices, seeded: each choice's entries are that choice's whole reply's.
    seeded = {**asked, "temperature": 1.0, "seed": 5, "max_completion_tokens": 12, "n": 2}
    replies = client.chat.completions.create(**seeded)
    by_choice = _by_choice(list(client.chat.completions.create(stream=True, **seeded)))
    for reply in replies.choices:
        assert reply.logprobs is not None and reply.logprobs.content is not None
        streamed = by_choice[reply.index]
        assert "".join(content for content, _ in streamed) == reply.message.content
        _same_entries([e for _, entries in streamed for e in entries], reply.logprobs.content)


def _write(
    played: PlayedExecutor, call: Any, so_far: str, new: list[str], start: int, run: str = "r1"
) -> list[int]:
    """The text so far and its new entries (from `start`, of decoding `run`) written: the
    entries stored."""
    entries = [[_entry(t) for t in new]]
    body = {"texts": [so_far], "logprobs": entries, "from": [start], "run": run}
    stored = played.progress(call, body).entries
    assert stored is not None
    return list(stored)


def _entry(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


def _listen(client: openai.OpenAI, received: queue.Queue[Any]) -> None:
    """Stream a chat with logprobs in a thread: each chunk's (content, entries' tokens) as it
    comes, then "end" (or the error)."""
    try:
        asked = {"model": "tiny-played", "messages": CHAT_MESSAGES, "logprobs": True}
        for chunk in client.chat.completions.create(stream=True, **asked):
            for choice in chunk.choices:
                entries = choice.logprobs.content if choice.logprobs is not None else None
                if choice.delta.content or entries:
                    received.put((choice.delta.content, [e.token for e in entries or []]))
        received.put("end")
    except Exception as error:  # the SDK's, raised while iterating
        received.put(error)


def test_each_write_appends_its_new_entries_and_the_stream_sends_each_once(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    client = openai_client(live_url, tenant_a.member)
    received: queue.Queue[Any] = queue.Queue()
    listener = threading.Thread(target=_listen, args=(client, received))
    listener.start()
    call = played.take()

    assert _write(played, call, "Hel", ["He", "l"], 0) == [2]
    assert received.get(timeout=30) == ("Hel", ["He", "l"])  # sent while the chat runs
    assert _write(played, call, "Hello wor", ["lo", " wor"], 2) == [4]  # appended
    assert received.get(timeout=30) == ("lo wor", ["lo", " wor"])
    stored = [_entry(t) for t in ("He", "l", "lo", " wor")]
    assert played.partial(call) == {"texts": ["Hello wor"], "logprobs": [stored], "run": "r1"}
    # A write that does not carry on from what is stored leaves it, and says what it holds.
    assert _write(played, call, "Hello wor", ["x"], 1) == [4]
    assert played.partial(call)["logprobs"] == [stored]

    # The stream reads only the entries past those it sent, and how many are stored.
    with services.engine.connect() as conn:
        for past, kept in (([0], stored), ([3], stored[3:]), ([4], []), ([9], []), ([], stored)):
            read = interactive.retrieve_past(conn, tenant_a.tenant_id, call.id, past)
            assert read.partial == {
                "texts": ["Hello wor"],
                "logprobs": [kept],
                "stored": [4],
                "run": "r1",
            }
            assert read.request == interactive.retrieve(conn, tenant_a.tenant_id, call.id).request
        whole = interactive.retrieve(conn, tenant_a.tenant_id, call.id)
        assert whole.partial == {"texts": ["Hello wor"], "logprobs": [stored], "run": "r1"}
        with pytest.raises(interactive.NotFound):  # another tenant's call
            interactive.retrieve_past(conn, "another-tenant", call.id, [0])

    # Decoded again (a batch run again a call at a time): from 0, the entries are replaced, and
    # the stream sends none of that decoding's until the whole answer, rather than send any twice.
    assert _write(played, call, "Hel", ["He", "l"], 0, run="r2") == [2]
    assert played.partial(call) == {"texts": ["Hel"], "logprobs": [stored[:2]], "run": "r2"}
    assert _write(played, call, "Hello world", ["lo", " wor", "ld"], 2, run="r2") == [5]
    time.sleep(0.5)  # the stream reads it
    assert received.empty()
    played.finish(
        call,
        "Hello world",
        tokens=[5, 6, 7, 8, 9],
        logprobs=[-0.5] * 5,
        content_logprobs=[*stored, _entry("ld")],
    )
    assert received.get(timeout=30) == ("ld", ["ld"])  # the rest, each entry once
    assert received.get(timeout=30) == "end"
    listener.join(30)


def test_the_executors_writer_stores_each_entry_once_through_an_outage_and_a_new_decoding(
    services: Services,
    proxy: CuttableProxy,
    proxied_url: str,
    settings: Settings,
    tenant_a: TenantKeys,
    live_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`StreamWriter` handed a chat's growing entries (all of them each time, as the decoding
    loop hands them): the call stores each entry once, whatever writes failed meanwhile, and a
    new decoding's entries in place of the old."""
    from control_plane.services import build_services

    monkeypatch.setattr(streaming, "PAUSE_AFTER_FAILURE_S", 0.5)
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    received: queue.Queue[Any] = queue.Queue()
    listener = threading.Thread(
        target=_listen, args=(openai_client(live_url, tenant_a.member), received)
    )
    listener.start()
    call = played.take()
    tokens = [f"t{k} " for k in range(40)]
    entries = [_entry(t) for t in tokens]

    def hand(writer: StreamWriter, count: int, run: str) -> None:
        writer({call.id: SoFar(["".join(tokens[:count])], [entries[:count]], run)})

    def stored_becomes(count: int, run: str) -> None:
        deadline = time.monotonic() + 30
        while played.partial(call) != {
            "texts": ["".join(tokens[:count])],
            "logprobs": [entries[:count]],
            "run": run,
        }:
            assert time.monotonic() < deadline, played.partial(call)
            time.sleep(0.05)

    written: list[int] = []  # the entries each write that went through carried
    progress = calls.progress

    def counted(conn: Any, executor_id: str, replies: dict[str, dict[str, Any]]) -> Any:
        done = progress(conn, executor_id, replies)
        written.append(len(replies[call.id]["logprobs"][0]))
        return done

    monkeypatch.setattr(calls, "progress", counted)
    cut_off = build_services(settings, database_url=proxied_url)
    try:
        writer = StreamWriter(cut_off, "exec-played")
        hand(writer, 3, run="r1")
        stored_becomes(3, "r1")
        proxy.cut()
        for count in range(4, 20):  # handed over while no write can go
            hand(writer, count, run="r1")
        time.sleep(1.0)
        proxy.restore()
        deadline = time.monotonic() + 30
        while played.partial(call)["texts"] != ["".join(tokens[:20])]:
            hand(writer, 20, run="r1")  # the decoding loop goes on: the writer tries again
            assert time.monotonic() < deadline, played.partial(call)
            time.sleep(0.2)
        stored_becomes(20, "r1")
        hand(writer, 30, run="r1")
        stored_becomes(30, "r1")
        assert sum(written) == 30  # each entry written once, not at every write
        # The call decoded again: its entries from the start, in place of the old.
        hand(writer, 2, run="r2")
        stored_becomes(2, "r2")
        hand(writer, 5, run="r2")
        stored_becomes(5, "r2")
        assert sum(written) == 35
        writer.close()
    finally:
        cut_off.close()
    played.finish(
        call, "".join(tokens), tokens=[5] * 40, logprobs=[-0.5] * 40, content_logprobs=entries
    )
    sent: list[str] = []
    while (piece := received.get(timeout=30)) != "end":
        assert not isinstance(piece, Exception), piece
        content, given = piece
        assert "".join(given) == content
        sent += given
    assert sent == tokens  # each entry sent once, in order, though stored twice over
    listener.join(30)


def test_a_chat_decoded_again_in_other_tokens_ends_its_stream_rather_than_mismatch_them(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    """Entries sent of one decoding, then the whole answer of another that wrote the same text
    in other tokens: the answer's first entries are not those sent, so the rest of them cannot
    follow them; the stream ends with an error rather than send entries for text twice."""
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    received: queue.Queue[Any] = queue.Queue()
    listener = threading.Thread(
        target=_listen, args=(openai_client(live_url, tenant_a.member), received)
    )
    listener.start()
    call = played.take()
    assert _write(played, call, "Hello", ["Hello"], 0) == [1]
    assert received.get(timeout=30) == ("Hello", ["Hello"])
    assert _write(played, call, "Hel", ["H", "e", "l"], 0, run="r2") == [3]
    other = [_entry(t) for t in ("H", "e", "l", "l", "o", " world")]
    played.finish(
        call, "Hello world", tokens=[5, 6, 7, 8, 9, 10], logprobs=[-0.5] * 6, content_logprobs=other
    )
    error = received.get(timeout=30)
    assert isinstance(error, openai.APIError) and "sampled again" in str(error), error
    listener.join(30)
