"""Deterministic synthetic instruction tasks for the demo and the tests.

Each task is an instruction plus a generator of (input, output) pairs. `make_task(name, split, n,
seed)` draws a pool of distinct queries from a seeded generator; a hash of each query's text puts it in the
train or the eval split for good, so the splits never overlap.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from seecl.data.task import Instance, Task
from seecl.errors import DataError

_NOUNS = [
    "apple",
    "river",
    "candle",
    "garden",
    "window",
    "rocket",
    "pencil",
    "forest",
    "bridge",
    "castle",
    "dragon",
    "guitar",
    "island",
    "jacket",
    "ladder",
    "mirror",
    "needle",
    "orange",
    "planet",
    "rabbit",
    "silver",
    "tunnel",
    "violin",
    "wallet",
    "yellow",
    "anchor",
    "basket",
    "cookie",
    "dolphin",
    "engine",
    "feather",
    "harbor",
    "kettle",
    "lemon",
    "meadow",
    "pillow",
]
_GOOD = [
    "delicious",
    "friendly",
    "wonderful",
    "excellent",
    "cheerful",
    "comfortable",
    "lovely",
    "fantastic",
    "reliable",
    "charming",
]
_BAD = ["terrible", "rude", "awful", "disappointing", "broken", "dirty", "boring", "noisy", "overpriced", "horrible"]
_SUBJECTS = [
    "The soup",
    "The hotel room",
    "The service",
    "The movie",
    "The phone",
    "The concert",
    "The bakery",
    "The taxi ride",
    "The museum",
    "The laptop",
    "The pizza",
    "The book",
]
_ENDINGS = [
    "and I would come back.",
    "and I will tell my friends.",
    "this time.",
    "from start to finish.",
    "as always.",
    "on our visit.",
]


def _reverse_list(rng: random.Random) -> tuple[str, str]:
    items = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return str(items), str(items[::-1])


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(_NOUNS, rng.randint(2, 3)))
    return words, words.upper()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 499), rng.randint(10, 499)
    return f"{a} + {b}", str(a + b)


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    adjective = rng.choice(_GOOD if positive else _BAD)
    text = f"{rng.choice(_SUBJECTS)} was {adjective} {rng.choice(_ENDINGS)}"
    return text, "positive" if positive else "negative"


def _km_to_m(rng: random.Random) -> tuple[str, str]:
    km = rng.randint(1, 250) if rng.random() < 0.6 else rng.randint(1, 250) / 10
    meters = round(km * 1000)
    return f"{km} km", f"{meters} m"


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    instruction: str
    generate: Callable[[random.Random], tuple[str, str]]


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in [
        SyntheticTask("reverse_list", "Reverse the order of the numbers in the list.", _reverse_list),
        SyntheticTask("uppercase", "Rewrite the words in capital letters.", _uppercase),
        SyntheticTask("add", "Add the two numbers and give only the sum.", _add),
        SyntheticTask("sentiment", "Is this review positive or negative?", _sentiment),
        SyntheticTask("km_to_m", "Convert the distance from kilometers to meters.", _km_to_m),
    ]
}


def _split_of(text: str) -> str:
    """Every distinct query belongs to one split for good (a fifth of them to eval)."""
    return "eval" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0 else "train"


def make_task(name: str, split: str = "train", n: int = 64, seed: int = 0) -> Task:
    """The first `n` distinct queries of a synthetic task that fall into `split`.

    Queries are assigned to train or eval by a hash of their text, so the two splits never share
    a query whatever sizes are asked for, and the same arguments always give the same instances.
    """
    if name not in SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {name!r}; known: {sorted(SYNTHETIC_TASKS)}")
    if split not in ("train", "eval"):
        raise DataError(f"synthetic split must be 'train' or 'eval', got {split!r}")
    spec = SYNTHETIC_TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    chosen: list[tuple[str, str]] = []
    attempts = 0
    while len(chosen) < n:
        attempts += 1
        if attempts > 200 * n + 2000:
            raise DataError(f"synthetic task {name!r} cannot produce {n} distinct {split} queries")
        text, answer = spec.generate(rng)
        if text in seen:
            continue
        seen.add(text)
        if _split_of(text) == split:
            chosen.append((text, answer))
    instances = tuple(
        Instance(f"{name}-{split}-{seed}-{i}", f"{spec.instruction}\n\n{text}", (answer,))
        for i, (text, answer) in enumerate(chosen)
    )
    return Task(name, instances, source=f"synthetic:{name}:{split}:{seed}")


GENERAL_QUERIES = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Give me three tips for sleeping better.",
    "Explain what photosynthesis is in one sentence.",
    "Who wrote Romeo and Juliet?",
    "Suggest a name for a friendly robot.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What are the primary colors?",
    "Describe a cat to someone who has never seen one.",
    "How many days are there in a leap year?",
    "Recommend a hobby for a rainy afternoon.",
    "What does a librarian do?",
)


def general_task() -> Task:
    """General instructions that belong to no synthetic task (out-of-distribution queries)."""
    instances = tuple(Instance(f"general-{i}", q, ("",)) for i, q in enumerate(GENERAL_QUERIES))
    return Task("general", instances, source="synthetic:general")
