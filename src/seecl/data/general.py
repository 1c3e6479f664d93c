"""General instructions: queries that belong to no task, the source of SEE's general negatives.

Owns the pool that ships with seecl (`general_instructions.jsonl`: 599 everyday chat requests,
coding and maths questions, writing and advice requests, written for seecl and released with it
under Apache-2.0, chosen to avoid the formats of the SuperNI benchmark tasks) and loading a user's
own pool instead (any supported format; responses are not needed).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from seecl.data.formats import load_instances
from seecl.data.task import Task

BUILTIN_SOURCE = "seecl:general_instructions.jsonl"


def builtin_general() -> Task:
    """The general instructions that ship with seecl."""
    with resources.as_file(resources.files("seecl.data") / "general_instructions.jsonl") as path:
        instances = load_instances(path, responses=False)
    return Task("general", tuple(instances), source=BUILTIN_SOURCE)


def load_general(path: str | Path | None) -> Task:
    """A general instruction set: the built-in one for None, else the instructions in `path`."""
    if path is None or str(path) == BUILTIN_SOURCE:
        return builtin_general()
    return Task("general", tuple(load_instances(path, responses=False)), source=str(path))
