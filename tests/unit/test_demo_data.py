"""The demo's data generator, its shipped files and its strict scorer (no model needed)."""

from __future__ import annotations

import json

import pytest

from loraforge.demo import skill as demo


def test_generators_are_deterministic():
    assert demo.generate_train() == demo.generate_train()
    assert demo.generate_heldout() == demo.generate_heldout()
    assert demo.generate_train(seed=1) != demo.generate_train(seed=2)


def test_shipped_files_are_what_the_generators_write(tmp_path):
    train, heldout = demo.write_data(tmp_path)
    assert train.read_bytes() == (demo.demo_data_dir() / demo.TRAIN_FILE).read_bytes()
    assert heldout.read_bytes() == (demo.demo_data_dir() / demo.HELDOUT_FILE).read_bytes()
    assert len(demo.load_train()) == demo.TRAIN_SIZE
    assert len(demo.load_heldout()) == demo.HELDOUT_SIZE == 20


def test_training_records_are_chat_records_answered_in_the_one_shape():
    for record in demo.load_train():
        assert list(record) == ["messages"]
        system, user, assistant = record["messages"]
        assert system == {"role": "system", "content": demo.SYSTEM_PROMPT}
        assert user["role"] == "user" and user["content"].startswith(demo.USER_PREFIX)
        assert assistant["role"] == "assistant"
        answer = json.loads(assistant["content"])
        assert list(answer) == list(demo.KEYS)
        assert type(answer["age"]) is int
        assert demo.score(assistant["content"], answer)
        for value in answer.values():
            assert str(value) in user["content"]


def test_heldout_records_carry_the_expected_answer_and_no_reply():
    for record in demo.load_heldout():
        assert sorted(record) == ["expected", "messages"]
        assert [m["role"] for m in record["messages"]] == ["system", "user"]
        assert list(record["expected"]) == list(demo.KEYS)
        for value in record["expected"].values():
            assert str(value) in demo.user_prompt(record)


def test_heldout_prompts_are_new():
    train, heldout = demo.load_train(), demo.load_heldout()
    train_prompts = {demo.user_prompt(r) for r in train}
    heldout_prompts = [demo.user_prompt(r) for r in heldout]
    assert len(train_prompts) == len(train), "training prompts repeat"
    assert len(set(heldout_prompts)) == len(heldout), "held-out prompts repeat"
    assert not train_prompts & set(heldout_prompts)
    # Stronger: no held-out name, city or job appears anywhere in the training data.
    train_text = "\n".join(json.dumps(r) for r in train)
    for record in heldout:
        expected = record["expected"]
        first, last = expected["name"].split(" ", 1)
        for word in (first, last, expected["city"], expected["job"]):
            assert word not in train_text, word


def test_vocabulary_pools_are_disjoint_and_phrasings_many():
    for train_side, heldout_side in (demo.FIRST_NAMES, demo.LAST_NAMES, demo.CITIES, demo.JOBS):
        assert not set(train_side) & set(heldout_side)
    assert len(set(demo.TEMPLATES)) >= 8
    used = {t for t in demo.TEMPLATES if any(_from_template(t, r) for r in demo.load_train())}
    assert used == set(demo.TEMPLATES), "every phrasing is trained on"


def _from_template(template: str, record: dict) -> bool:
    answer = json.loads(record["messages"][2]["content"])
    person = demo.Person(**answer)
    prompt = demo.user_prompt(record)
    return any(
        prompt == demo.USER_PREFIX + json.dumps(demo.sentence(template, person, year))
        for year in range(1998, 2025)
    )


EXPECTED = {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}


def test_score_accepts_the_exact_answer_with_surrounding_whitespace():
    exact = '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}'
    assert demo.answer_text(EXPECTED) == exact
    assert demo.score(exact, EXPECTED)
    assert demo.score(f"  {exact}\n", EXPECTED)
    assert demo.score('{"name":"Maria Lopez","age":34,"city":"Lisbon","job":"nurse"}', EXPECTED)


@pytest.mark.parametrize(
    "answer",
    [
        'Here it is: {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"} Hope this helps!',
        '```json\n{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}\n```',
        '{"name": "Maria Lopez", "age": "34", "city": "Lisbon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": 34.0, "city": "Lisbon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse", "year": 2019}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon"}',
        '{"age": 34, "name": "Maria Lopez", "city": "Lisbon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "Nurse"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "a nurse"}',
        '{"name": "Maria", "name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}',
        '[{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}]',
        '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"',
        "",
    ],
    ids=[
        "prose-before",
        "prose-after",
        "code-fence",
        "age-as-string",
        "age-as-float",
        "extra-key",
        "missing-key",
        "key-order",
        "wrong-case",
        "wrong-value",
        "duplicate-key",
        "not-an-object",
        "truncated",
        "empty",
    ],
)
def test_score_is_strict(answer):
    assert not demo.score(answer, EXPECTED)


def test_score_does_not_take_a_bool_for_an_int():
    assert not demo.score('{"flag": true}', {"flag": 1})
    assert demo.score('{"flag": 1}', {"flag": 1})


def test_demo_hyperparameters_are_valid_and_cheap():
    hp = demo.DEMO_HYPERPARAMETERS
    assert hp.target_modules == "all-linear"
    assert hp.max_seq_length >= 128
    steps = hp.n_epochs * -(-demo.TRAIN_SIZE // hp.batch_size)
    assert steps <= 200
