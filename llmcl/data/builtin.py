"""The built-in task stream: small generated tasks, deterministic by seed, that interfere with each other.

Every task is prompt/completion with the same answer slot ("...\\nAnswer: <x>"), so training on a later
task overwrites what the shared slot produced for an earlier one. Two tasks inject new knowledge (random
fictional facts and a fictional vocabulary: the test split asks the same items, measuring retention) and
two teach a skill (word reversal and two-digit addition: the test split holds unseen items).

    builtin:facts       Q: In which city does <fictional person> live?      -> <fictional city>
    builtin:vocab       Translate into Zorbic: <English noun>                -> <fictional word>
    builtin:reverse     Reverse the order of these words: a b c              -> c b a
    builtin:arithmetic  What is 37 plus 48?                                  -> 85
"""

from __future__ import annotations

import json

import random
from pathlib import Path
from typing import Callable

_NOUNS = (
    "apple river stone cloud garden window bridge candle forest mirror island ladder pencil rocket "
    "saddle tiger violin wagon anchor basket castle desert engine feather glove hammer jacket kettle "
    "lantern marble needle orange parrot quilt rabbit shovel tunnel umbrella valley whistle yarn zebra "
    "button cactus dragon eagle falcon guitar harbor igloo jungle koala lemon meadow nest ocean piano "
    "queen robot spoon tomato unicorn village walnut yacht blanket cherry donkey elbow fountain goose "
    "helmet insect jelly kitten lizard magnet noodle otter pepper rainbow sandal teapot turtle vase "
    "wallet canyon barrel comet dolphin ember fossil glacier hammock iris jasmine kayak lotus mango"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vo", "zu", "bel", "dra", "fin", "gor", "hal", "jin", "kor",
              "lum", "mar", "nel", "pra", "quo", "sil", "tar", "ul", "vex", "wyn", "yor", "zel", "an", "ith")


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts))


def _unique_words(rng: random.Random, n: int, parts: int, capitalize: bool) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = _word(rng, parts)
        if w not in seen:
            seen.add(w)
            out.append(w.capitalize() if capitalize else w)
    return out


def _facts(rng: random.Random, split: str) -> list[dict]:
    cities = _unique_words(rng, 16, 3, True)
    firsts = _unique_words(rng, 48, 2, True)
    lasts = _unique_words(rng, 48, 2, True)
    rows = []
    for first, last in zip(firsts, lasts):
        city = rng.choice(cities)
        rows.append({"prompt": f"Q: In which city does {first} {last} live?\nAnswer:", "completion": f" {city}"})
    return rows  # knowledge injection: the test split asks the same facts


def _vocab(rng: random.Random, split: str) -> list[dict]:
    nouns = rng.sample(_NOUNS, 48)
    words = _unique_words(rng, 48, 2, False)
    return [{"prompt": f"Translate into Zorbic: {n}\nAnswer:", "completion": f" {w}"} for n, w in zip(nouns, words)]


def _held_out(rng: random.Random, split: str, make: Callable[[random.Random], tuple[str, str]],
              n_train: int, n_test: int) -> list[dict]:
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_test:
        prompt, completion = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
    return rows[n_test:] if split == "train" else rows[:n_test]


def _reverse(rng: random.Random, split: str) -> list[dict]:
    def make(r: random.Random) -> tuple[str, str]:
        words = r.sample(_NOUNS, 3)
        return (f"Reverse the order of these words: {' '.join(words)}\nAnswer:", " " + " ".join(reversed(words)))

    return _held_out(rng, split, make, 2000, 100)


def _arithmetic(rng: random.Random, split: str) -> list[dict]:
    def make(r: random.Random) -> tuple[str, str]:
        a, b = r.randint(10, 99), r.randint(10, 99)
        return f"What is {a} plus {b}?\nAnswer:", f" {a + b}"

    return _held_out(rng, split, make, 2000, 100)


TASKS: dict[str, tuple[Callable[[random.Random, str], list[dict]], str]] = {
    "facts": (_facts, "48 fictional person -> city facts (knowledge injection; test = recall)"),
    "vocab": (_vocab, "48 English -> fictional 'Zorbic' words (knowledge injection; test = recall)"),
    "reverse": (_reverse, "reverse three words (2000 train / 100 unseen test)"),
    "arithmetic": (_arithmetic, "two-digit addition (2000 train / 100 unseen test)"),
}
SPLITS = ("train", "test")


def generate(name: str, split: str, seed: int) -> list[dict]:
    """Records {prompt, completion} of built-in task `name`; the same (name, split, seed) gives the same list."""
    fn, _ = TASKS[name]
    # seed a private generator from a string: stable across processes and PYTHONHASHSEED
    return fn(random.Random(f"llmcl-builtin:{name}:{seed}"), split)


def write_text_corpus(path: Path, repeat: int = 1) -> Path:
    """Every built-in task's training examples as plain text documents (JSON lines), `repeat` times: a corpus
    for throughput measurements, packed into full seq_len blocks."""
    rows = [{"text": r["prompt"] + r["completion"]} for task in sorted(TASKS) for r in generate(task, "train", 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * repeat))
    return path
