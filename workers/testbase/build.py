"""Build the tiny Llama test base in `workers/testbase/model/` (run: `python -m workers.testbase.build`).

Why a home-made base: tests and CI have no model hub, and a real architecture (Llama, with
grouped-query attention, tied embeddings and a ChatML chat template like SmolLM2's) exercises the
same transformers + peft code paths as production at a size where a training job takes seconds.

The build is deterministic: the corpus is generated from a fixed seed, the BPE trainer is
deterministic for a given corpus, and the weights come from a seeded initialisation. The weights
are random (the model is not pretrained): tests only need a real network that a LoRA can move.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.testbase import TEST_BASE_PATH

SEED = 1234
VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# ChatML, as SmolLM2-Instruct uses it (without its default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COUNTRIES = {
    "France": "Paris",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}
_SUBJECTS = ["The model", "A student", "The assistant", "My friend", "The teacher", "Our team"]
_VERBS = ["reads", "writes", "answers", "explains", "summarises", "translates", "checks"]
_OBJECTS = ["the question", "a short story", "the report", "an email", "the code", "a poem"]
_PARAGRAPHS = [
    "You are a helpful assistant. Answer the question in one short sentence.",
    "Fine-tuning adapts a pretrained language model to a task with a small dataset.",
    "A low-rank adapter adds two small matrices next to a frozen weight matrix.",
    "The weather today is sunny with a light wind from the west, and tomorrow it may rain.",
    "Numbers: zero one two three four five six seven eight nine ten eleven twelve.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    '{"name": "loraforge", "kind": "adapter", "rank": 16, "alpha": 32}',
]


def training_corpus(lines: int = 3000) -> Iterator[str]:
    """Yield a small, seeded English-ish corpus with chat markup, code and JSON."""
    rng = random.Random(SEED)
    yield from _PARAGRAPHS
    for _ in range(lines):
        country = rng.choice(sorted(_COUNTRIES))
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield rng.choice(
            [
                f"The capital of {country} is {_COUNTRIES[country]}.",
                f"What is the capital of {country}? It is {_COUNTRIES[country]}.",
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}.",
                f"What is {a} plus {b}? The answer is {a + b}.",
                f"user\nPlease {rng.choice(_VERBS)[:-1]} {rng.choice(_OBJECTS)}.",
                f"assistant\nSure, here is {rng.choice(_OBJECTS)}.",
                rng.choice(_PARAGRAPHS),
            ]
        )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus and wrap it as a transformers tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A two-layer Llama with grouped-query attention and tied embeddings, seeded, in bf16."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(torch.bfloat16)


def build(out_dir: Path = TEST_BASE_PATH) -> Path:
    """Write tokenizer and weights into `out_dir`, replacing it atomically."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".build-") as tmp:
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        # The chat template goes into tokenizer_config.json, which every transformers reads.
        tokenizer.save_pretrained(staged, save_jinja_files=False)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TEST_BASE_PATH)
    args = parser.parse_args()
    path = build(args.out)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote {path} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
