"""A task: a name plus its instances (query, one or more reference responses).

Owns the in-memory representation and its fingerprint. Reading files is formats.py's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from ..errors import DataError

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
                raise DataError(f"task {self.name!r}: duplicate instance id {inst.id!r}",
                                self.source or None)
            seen.add(inst.id)

    def __len__(self) -> int:
        return len(self.instances)

    def head(self, n: int | None) -> "Task":
        """The first n instances (all when n is None)."""
        if n is None or n >= len(self.instances):
            return self
        return Task(self.name, self.instances[:n], self.source)

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
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name
