"""A task: a name plus its instances (query, one or more reference responses).

Owns the in-memory representation and its fingerprint. Reading files is formats.py's job.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass

from seecl.errors import DataError

_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


@dataclass(frozen=True)
class Instance:
    id: str
    query: str
    references: tuple[str, ...]

    @property
    def response(self) -> str:
        """The training target: the first reference."""
        return self.references[0]


@dataclass(frozen=True)
class Task:
    name: str
    instances: tuple[Instance, ...]
    source: str = ""

    def __post_init__(self) -> None:
        check_name(self.name, "task")
        if not self.instances:
            raise DataError(f"task {self.name!r} has no instances", self.source or None)
        seen: set[str] = set()
        for inst in self.instances:
            if inst.id in seen:
                raise DataError(f"task {self.name!r}: duplicate instance id {inst.id!r}", self.source or None)
            seen.add(inst.id)

    def __len__(self) -> int:
        return len(self.instances)

    def head(self, n: int | None) -> Task:
        """The first n instances (all when n is None)."""
        if n is None or n >= len(self.instances):
            return self
        return Task(self.name, self.instances[:n], self.source)

    def labels(self) -> Counter:
        """How often each first reference occurs: the label counts of a classification task."""
        return Counter(inst.response.strip() for inst in self.instances)

    def looks_like_classification(self) -> bool:
        """A few responses, each repeated: at most 20 distinct, every one used at least twice on average."""
        labels = self.labels()
        return 1 < len(labels) <= 20 and len(self.instances) >= 2 * len(labels)

    def sample(self, n: int, seed: int = 0) -> Task:
        """A seeded sample of n instances, in file order; a classification-looking task is sampled
        per label in proportion to the label counts (largest remainders), so a label-sorted file
        gives the same label balance as the whole file."""
        if n >= len(self.instances):
            return self
        rng = random.Random(f"sample:{seed}:{self.name}")
        if not self.looks_like_classification():
            chosen = set(rng.sample(range(len(self.instances)), n))
        else:
            by_label: dict[str, list[int]] = {}
            for index, inst in enumerate(self.instances):
                by_label.setdefault(inst.response.strip(), []).append(index)
            shares = {label: n * len(rows) / len(self.instances) for label, rows in by_label.items()}
            take = {label: int(share) for label, share in shares.items()}
            for label in sorted(shares, key=lambda x: (take[x] - shares[x], x))[: n - sum(take.values())]:
                take[label] += 1
            chosen = {i for label, rows in by_label.items() for i in rng.sample(rows, take[label])}
        return Task(self.name, tuple(self.instances[i] for i in sorted(chosen)), self.source)

    def fingerprint(self) -> str:
        """sha256 over ids, queries and references: identifies the exact training data."""
        digest = hashlib.sha256()
        for inst in self.instances:
            digest.update(json.dumps([inst.id, inst.query, list(inst.references)]).encode())
        return digest.hexdigest()


def check_name(name: str, what: str) -> str:
    """Names become directory and adapter names: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise DataError(
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name
