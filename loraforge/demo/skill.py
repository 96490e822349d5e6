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
- `score`: strict check of one answer (`loraforge.demo.evaluation` decodes and scores models).
- `DEMO_HYPERPARAMETERS`: what the demo's job asks for (measured on a 2-core CPU in bf16).
"""

from __future__ import annotations

import argparse
import json
import random
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraforge.demo.skill", description=__doc__)
    parser.add_argument(
        "--write-data", action="store_true", required=True, help="regenerate data/*.jsonl"
    )
    parser.parse_args(argv)
    for path in write_data():
        print(f"wrote {path} ({len(read_jsonl(path))} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
