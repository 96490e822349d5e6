"""The demo's skill: a sentence about a person in, one strict JSON object out.

`loraforge demo` trains an adapter that the held-out prompts can check by program. A user turn
`Extract the person as JSON: "Maria Lopez, 34, moved to Lisbon in 2019 to work as a nurse."`
must be answered with exactly `{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job":
"nurse"}`: those four keys in that order, the age an integer, nothing before or after. The base
model knows what JSON is but not this shape (it adds code fences, prose, other keys, or strings
for numbers), so its score is low and the adapter's is high.

Everything here is deterministic and offline:

- `generate_train` / `generate_heldout`: seeded generators. Sentences come from `TEMPLATES`
  (phrasings that put the facts in different orders, some with a distracting year). Held-out
  examples use first names, surnames, cities and jobs that no training example contains, so a
  held-out prompt cannot be answered from memory, only by extracting.
- `loraforge/demo/data/train.jsonl` and `heldout.jsonl` are written from them by
  `python -m loraforge.demo.skill --write-data` and ship with the project (`demo_data_dir()`).
  A training line is a chat record `{"messages": [system, user, assistant]}` (what the platform
  accepts as a dataset); a held-out line is `{"messages": [system, user], "expected": {...}}`.
- `score`: strict check of one answer. `generate_answers`: greedy decoding with the chat template.
  `evaluate`: the base's score, then the base + adapter's, with rows for a side-by-side print.
- `DEMO_HYPERPARAMETERS`: what the demo's job asks for (measured on a 2-core CPU in bf16).

`python -m loraforge.demo.skill --local` trains and evaluates in-process (no platform), for measuring.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.hyperparameters import Hyperparameters

SYSTEM_PROMPT = "You are a data extraction assistant. Reply with JSON only."
USER_PREFIX = "Extract the person as JSON: "
KEYS = ("name", "age", "city", "job")
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
TRAIN_SIZE = 200
HELDOUT_SIZE = 20
TRAIN_SEED = 20240611
HELDOUT_SEED = 77

# What the demo's job asks for: see the module docstring of workers.training.recipe for the loop.
DEMO_HYPERPARAMETERS = Hyperparameters(
    n_epochs=1,
    batch_size=8,
    learning_rate_multiplier=5.0,
    lora_rank=16,
    lora_alpha=32,
    target_modules="all-linear",
    max_seq_length=192,
    warmup_ratio=0.05,
    lr_scheduler="cosine",
    seed=42,
    checkpoint_every_steps=40,
)

# Phrasings of the same four facts. `{a_job}` is the job with its article ("an architect").
# Some put a year beside the age, so the model must tell which number is the age.
TEMPLATES: tuple[str, ...] = (
    "{name}, {age}, moved to {city} in {year} to work as {a_job}.",
    "{name} is a {age}-year-old {job} living in {city}.",
    "At {age}, {name} works as {a_job} in {city}.",
    "{name} ({age}) is {a_job} based in {city}.",
    "Meet {name}: {age} years old, {a_job} from {city}.",
    "{name}, {a_job} aged {age}, lives in {city}.",
    "In {city}, {age}-year-old {name} has found work as {a_job}.",
    "{name} has lived in {city} since {year}; the {job} is {age}.",
    "The {job} {name}, {age}, commutes every day across {city}.",
    "After years abroad, {name} returned to {city}, where the {age}-year-old works as {a_job}.",
    "{city} is home to {name}, {a_job} who turned {age} in {year}.",
    "Now {age}, {name} started as {a_job} in {city} back in {year}.",
)


def _pools(train: str, heldout: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(train.split(", ")), tuple(heldout.split(", "))


# Vocabulary pools: (training, held-out); the two sides never share an entry.
FIRST_NAMES = _pools(
    train=(
        "Maria, James, Aisha, Kenji, Olga, Pedro, Fatima, Liam, Chen, Sofia, Ahmed, Emma, "
        "Ravi, Ingrid, Tomasz, Yuki, Daniel, Amara, Lucas, Nadia, Oscar, Priya, Hugo, Leila, "
        "Mateo, Hannah, Kwame, Elena, Jonas, Mei, Victor, Zara, Andre, Freya, Omar, Clara, "
        "Diego, Anya, Samuel, Noor"
    ),
    heldout=(
        "Beatriz, Tariq, Sven, Keiko, Rafael, Imani, Niklas, Lucia, Arjun, Greta, Felipe, "
        "Yasmin, Bruno, Hana"
    ),
)
LAST_NAMES = _pools(
    train=(
        "Lopez, Smith, Khan, Tanaka, Petrova, Silva, Haddad, Murphy, Wang, Rossi, Hassan, "
        "Brown, Patel, Larsen, Nowak, Sato, Cohen, Okafor, Martin, Ivanova, Berg, Sharma, "
        "Dubois, Karimi, Garcia, Fischer, Mensah, Popescu, Weber, Li, Moreau, Ali, Costa, "
        "Nielsen, Farouk, Schmidt, Romero, Kowalski, Adeyemi, Yilmaz"
    ),
    heldout=(
        "Ferreira, Lindqvist, Nakamura, Oyelaran, Castellano, Brandt, Kaur, Hoffmann, Mbeki, "
        "Santoro, Varga, Quintero, Halvorsen, Aziz"
    ),
)
CITIES = _pools(
    train=(
        "Lisbon, Berlin, Toronto, Osaka, Nairobi, Madrid, Chicago, Dublin, Seoul, Milan, "
        "Cairo, Sydney, Warsaw, Lyon, Manchester, Denver, Bergen, Pune, Kyoto, Lagos, Porto, "
        "Hamburg, Vancouver, Rotterdam, Krakow, Valencia, Buenos Aires, Cape Town, New York, "
        "Tel Aviv, San Diego, Hong Kong"
    ),
    heldout=(
        "Lima, Helsinki, Accra, Brisbane, Glasgow, Bologna, Montreal, Ghent, Kuala Lumpur, "
        "Salt Lake City, Rio de Janeiro, Edinburgh"
    ),
)
JOBS = _pools(
    train=(
        "nurse, teacher, software engineer, architect, chef, electrician, accountant, "
        "pharmacist, journalist, graphic designer, bus driver, dentist, lawyer, plumber, "
        "photographer, data analyst, firefighter, librarian, mechanic, translator, baker, "
        "pilot, veterinarian, carpenter, economist, physiotherapist, police officer, "
        "sales manager"
    ),
    heldout=(
        "surgeon, florist, civil engineer, interior designer, paramedic, tailor, biologist, "
        "tour guide, radio host, optician"
    ),
)

_ARTICLE_AN = ("a", "e", "i", "o")


@dataclass(frozen=True)
class Person:
    name: str
    age: int
    city: str
    job: str

    def expected(self) -> dict[str, Any]:
        """The one correct answer, keys in the order of `KEYS`."""
        return {"name": self.name, "age": self.age, "city": self.city, "job": self.job}


def _with_article(job: str) -> str:
    return f"{'an' if job.startswith(_ARTICLE_AN) else 'a'} {job}"


def sentence(template: str, person: Person, year: int) -> str:
    return template.format(
        name=person.name,
        age=person.age,
        city=person.city,
        job=person.job,
        a_job=_with_article(person.job),
        year=year,
    )


def answer_text(expected: dict[str, Any]) -> str:
    """The exact assistant reply for `expected` (`json.dumps`: `", "` and `": "` separators)."""
    return json.dumps(expected, ensure_ascii=False)


def prompt_messages(text: str) -> list[dict[str, str]]:
    """System and user turns asking for the extraction of `text`."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f'{USER_PREFIX}"{text}"'},
    ]


def _people(rng: random.Random, side: int, count: int) -> list[tuple[Person, str, int]]:
    """`count` distinct (person, template, year) draws from side 0 (train) or 1 (held-out)."""
    drawn: list[tuple[Person, str, int]] = []
    seen: set[str] = set()
    while len(drawn) < count:
        person = Person(
            name=f"{rng.choice(FIRST_NAMES[side])} {rng.choice(LAST_NAMES[side])}",
            age=rng.randint(19, 78),
            city=rng.choice(CITIES[side]),
            job=rng.choice(JOBS[side]),
        )
        template = TEMPLATES[len(drawn) % len(TEMPLATES)]  # every phrasing equally often
        year = rng.randint(1998, 2024)
        text = sentence(template, person, year)
        if text in seen:
            continue
        seen.add(text)
        drawn.append((person, template, year))
    rng.shuffle(drawn)
    return drawn


def generate_train(count: int = TRAIN_SIZE, seed: int = TRAIN_SEED) -> list[dict[str, Any]]:
    """Chat records `{"messages": [system, user, assistant]}` from the training vocabulary."""
    records = []
    for person, template, year in _people(random.Random(seed), 0, count):
        messages = prompt_messages(sentence(template, person, year))
        messages.append({"role": "assistant", "content": answer_text(person.expected())})
        records.append({"messages": messages})
    return records


def generate_heldout(count: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[dict[str, Any]]:
    """`{"messages": [system, user], "expected": {...}}` from the held-out vocabulary only."""
    return [
        {
            "messages": prompt_messages(sentence(template, person, year)),
            "expected": person.expected(),
        }
        for person, template, year in _people(random.Random(seed), 1, count)
    ]


# --------------------------------------------------------------------------------------------
# Shipped data
# --------------------------------------------------------------------------------------------


def demo_data_dir() -> Path:
    """Where the shipped `train.jsonl` and `heldout.jsonl` live."""
    return Path(__file__).resolve().parent / "data"


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_data(directory: Path | None = None) -> tuple[Path, Path]:
    """Write the training and held-out files from the generators; returns their paths."""
    directory = Path(directory) if directory is not None else demo_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    train, heldout = directory / TRAIN_FILE, directory / HELDOUT_FILE
    write_jsonl(train, generate_train())
    write_jsonl(heldout, generate_heldout())
    return train, heldout


def load_train() -> list[dict[str, Any]]:
    return read_jsonl(demo_data_dir() / TRAIN_FILE)


def load_heldout() -> list[dict[str, Any]]:
    return read_jsonl(demo_data_dir() / HELDOUT_FILE)


def user_prompt(record: dict[str, Any]) -> str:
    """The user turn of a record (what must never be shared between training and held-out)."""
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


# --------------------------------------------------------------------------------------------
# Scoring and evaluation
# --------------------------------------------------------------------------------------------


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(key)
        result[key] = value
    return result


def score(answer: str, expected: dict[str, Any]) -> bool:
    """Whether `answer` is exactly the expected object: valid JSON and nothing else around it,
    the same keys in the same order (no duplicates), equal values of the same JSON types."""
    try:
        parsed = json.loads(answer.strip(), object_pairs_hook=_no_duplicates)
    except ValueError:
        return False
    if not isinstance(parsed, dict) or list(parsed) != list(expected):
        return False
    # `type(...) is` rather than `==`: 34.0 == 34 and True == 1 in Python, not in the shape.
    return all(
        type(parsed[key]) is type(value) and parsed[key] == value for key, value in expected.items()
    )


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies (new text only) to chat `prompts`, rendered with the chat template.

    Prompts are decoded in left-padded batches of similar lengths; the model is used as it is
    (load it in bf16 for speed on a CPU with bf16 support).
    """
    import torch
    from transformers import GenerationConfig

    rendered = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    eos = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    eos_ids = [i for i in {tokenizer.eos_token_id, eos} if i is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    answers: list[str] = [""] * len(rendered)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer(
                    [rendered[i] for i in chunk],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(model.device)
                output = model.generate(**batch, generation_config=config)
                new = output[:, batch["input_ids"].shape[1] :]
                for index, tokens in zip(chunk, new, strict=True):
                    answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return answers


@dataclass(frozen=True)
class Row:
    """One held-out prompt with both models' answers."""

    prompt: str
    expected: dict[str, Any]
    base_answer: str
    base_correct: bool
    adapter_answer: str | None
    adapter_correct: bool | None


def evaluate(
    base_dir: Path,
    adapter_dir: Path | None,
    heldout: Sequence[dict[str, Any]],
    max_new_tokens: int = 48,
) -> tuple[int, int | None, list[Row]]:
    """Score the base, then base + adapter, on `heldout`; returns (base, adapter, rows).

    The base is loaded once in bf16 (fp32 where the hardware has no bf16); the adapter is
    attached to it with `PeftModel.from_pretrained`. `adapter_dir=None` scores the base only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.device import default_device, resolve_precision

    device = default_device()
    dtype = torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    prompts = [record["messages"] for record in heldout]
    expected = [record["expected"] for record in heldout]
    base_answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    base_marks = [score(a, e) for a, e in zip(base_answers, expected, strict=True)]
    adapter_answers: list[str | None] = [None] * len(heldout)
    adapter_marks: list[bool | None] = [None] * len(heldout)
    if adapter_dir is not None:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, adapter_dir).eval()
        answers = generate_answers(adapted, tokenizer, prompts, max_new_tokens)
        adapter_answers = list(answers)
        adapter_marks = [score(a, e) for a, e in zip(answers, expected, strict=True)]
    rows = [
        Row(user_prompt(record), exp, b, bm, a, am)
        for record, exp, b, bm, a, am in zip(
            heldout, expected, base_answers, base_marks, adapter_answers, adapter_marks, strict=True
        )
    ]
    adapter_score = sum(bool(m) for m in adapter_marks) if adapter_dir is not None else None
    return sum(base_marks), adapter_score, rows


def format_rows(rows: Sequence[Row], width: int = 60) -> str:
    """A side-by-side listing of the held-out answers, one block per prompt."""

    def clip(text: str | None) -> str:
        text = (text or "").replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = []
    for number, row in enumerate(rows, 1):
        lines.append(f"{number:2d}. {row.prompt[len(USER_PREFIX) :]}")
        lines.append(f"    base    {'✓' if row.base_correct else '✗'} {clip(row.base_answer)}")
        if row.adapter_answer is not None:
            mark = "✓" if row.adapter_correct else "✗"
            lines.append(f"    adapter {mark} {clip(row.adapter_answer)}")
    return "\n".join(lines)


def summary(base_score: int, adapter_score: int | None, total: int) -> str:
    if adapter_score is None:
        return f"held-out: base {base_score}/{total}"
    return f"held-out: base {base_score}/{total} → adapter {adapter_score}/{total}"


# --------------------------------------------------------------------------------------------
# Command line: write the shipped data, or train and evaluate in-process for measurement
# --------------------------------------------------------------------------------------------


def run_local(
    cache_root: Path,
    output_dir: Path,
    hp: Hyperparameters = DEMO_HYPERPARAMETERS,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """Train the demo adapter with the recipe alone (no platform) and evaluate it; print figures."""
    import torch

    from workers.bases.smollm2 import ensure_smollm2
    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    base_dir = ensure_smollm2(cache_root, progress=True)
    train = load_train()[:train_limit]
    heldout = load_heldout()
    loaded = time.perf_counter()
    base = ResidentBase.load(base_dir)
    load_s = time.perf_counter() - loaded

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        del data
        print(f"  [{kind}] {message}", file=sys.stderr, flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_adapter(base, train, None, hp, TrainHooks(on_event=on_event), output_dir)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    assert result.adapter_dir is not None
    started, cpu_started = time.perf_counter(), time.process_time()
    base_score, adapter_score, rows = evaluate(base_dir, result.adapter_dir, heldout)
    eval_s, eval_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    print(format_rows(rows))
    print(summary(base_score, adapter_score, len(heldout)))
    figures = {
        "train_examples": len(train),
        "steps": result.global_step,
        "trained_tokens": result.trained_tokens,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "tokens_per_s": round(result.trained_tokens / train_s, 1),
        "final_train_loss": result.final_train_loss,
        "precision": result.precision,
        "base_load_s": round(load_s, 1),
        "eval_s": round(eval_s, 1),
        "eval_cpu_s": round(eval_cpu_s, 1),
        "torch_threads": torch.get_num_threads(),
        "base_score": base_score,
        "adapter_score": adapter_score,
        "heldout": len(heldout),
        "adapter_dir": str(result.adapter_dir),
    }
    print(json.dumps(figures))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.demo.skill", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-data", action="store_true", help="regenerate demo_data/*.jsonl")
    action.add_argument("--local", action="store_true", help="train + evaluate in-process")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "loraforge" / "test-bases",
        help="base-model cache (default: the one the realmodel tests share)",
    )
    parser.add_argument("--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--hp", default="{}", help="JSON overrides of DEMO_HYPERPARAMETERS")
    args = parser.parse_args(argv)
    if args.write_data:
        for path in write_data():
            print(f"wrote {path} ({len(read_jsonl(path))} records)")
        return 0
    hp = DEMO_HYPERPARAMETERS.model_copy(update=json.loads(args.hp))
    hp = Hyperparameters.model_validate(hp.model_dump())
    run_local(args.cache, args.output, hp, args.train_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
