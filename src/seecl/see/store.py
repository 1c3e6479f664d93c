"""Experts on disk: an ensemble directory with a manifest and one PEFT adapter directory per expert.

Layout::

    ENSEMBLE/
      manifest.json            base model, indicator setup, ordered experts (oldest first)
      tokenizer/               the base tokenizer with the indicator tokens
      experts/<name>/          adapter_config.json + adapter_model.safetensors (plain PEFT),
                               expert.json (metadata) and memory.jsonl (the task's query memory)

Writes are atomic: an expert is written to a staging directory and renamed into place, then the
manifest is replaced with os.replace. Only experts listed in the manifest exist for readers, so a
half-written expert is never visible; committing never modifies an older expert. Readers (`seecl
ask`, `seecl serve`) take no lock and never write experts.

One learner at a time: `learning()` holds `.learn.lock` for a whole learn (reconstruction,
training and commit), so no expert is trained without the queries of one committed meanwhile; a
second learner fails at once, naming the holder. Short writes (creating the ensemble, committing)
take `.lock`. Everything written lives under the ensemble directory (expert names are checked
before they become paths). This module does not train or load models.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seecl.data.task import check_name
from seecl.errors import DataError, StoreError
from seecl.publish import (
    _alive,
    clean_stale,
    held,
    make_dir,
    now,
    publish_dir,
    read_json_object,
    write_json_atomic,
)

FORMAT = "seecl-ensemble/1"
MANIFEST = "manifest.json"
LEARN_LOCK = ".learn.lock"
WORK = ".work"  # resumable training checkpoints, one directory per expert being learned
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def validate_expert_name(name: str) -> str:
    try:
        return check_name(name, "expert")
    except DataError as exc:
        raise StoreError(str(exc)) from None


@dataclass(frozen=True)
class MemoryItem:
    id: str
    query: str


@dataclass(frozen=True)
class QueryMemory:
    """A seeded sample of one task's queries (never responses), enough for tau <= memory_tau."""

    task: str
    total: int  # |D_j|, the size of the task's training set
    items: tuple[MemoryItem, ...]


class EnsembleStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # -- reading ---------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise StoreError(f"no ensemble at {self.root} (manifest.json missing)")
        data = read_json_object(self.manifest_path, "corrupt manifest", StoreError)
        if data.get("format") != FORMAT:
            raise StoreError(f"{self.manifest_path}: unsupported format {data.get('format')!r}")
        return data

    def records(self) -> list[dict[str, Any]]:
        """Manifest records of the experts, oldest first."""
        return list(self.manifest()["experts"])

    def expert_names(self) -> list[str]:
        return [e["name"] for e in self.records()]

    def manifest_stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever the manifest is replaced (a commit): (inode, size, mtime in ns)."""
        try:
            stat = self.manifest_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def expert_dir(self, name: str) -> Path:
        return self.root / "experts" / validate_expert_name(name)

    def work_dir(self, name: str) -> Path:
        """Where expert `name`'s training keeps its resumable checkpoint while it is being learned."""
        return self.root / WORK / validate_expert_name(name)

    def expert_meta(self, name: str) -> dict[str, Any]:
        if name not in self.expert_names():
            raise StoreError(f"no expert named {name!r} in {self.root}")
        return read_json_object(self.expert_dir(name) / "expert.json", "unreadable expert record", StoreError)

    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def memory(self, name: str) -> QueryMemory:
        meta = self.expert_meta(name)
        path = self.expert_dir(name) / "memory.jsonl"
        items = []
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line.rstrip(b"\r\n"))  # an error at the end is reported there
                except (ValueError, RecursionError) as exc:
                    raise StoreError(f"{path}:{number}: unreadable query memory ({exc})") from None
                if not (isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("id", "query"))):
                    raise StoreError(f"{path}:{number}: a query memory line needs string 'id' and 'query'")
                items.append(MemoryItem(record["id"], record["query"]))
        return QueryMemory(meta["task"], int(meta["memory"]["total"]), tuple(items))

    def memories(self) -> list[QueryMemory]:
        return [self.memory(name) for name in self.expert_names()]

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        make_dir(self.root, StoreError)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def learning(self, what: str) -> Iterator[None]:
        """Hold the ensemble for one learner (`what` it does, for others to read) or fail at once."""
        with held(self.root / LEARN_LOCK, what, StoreError):
            yield

    def _try_lock(self) -> bool:
        """Whether no writer holds the ensemble lock right now (checked without waiting)."""
        with open(self.root / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    def create(self, model: dict[str, Any], indicators: dict[str, Any], vocab_size: int, tokenizer: Any) -> None:
        """Start an empty ensemble for a base model (no-op check if it already exists)."""
        if self.exists():  # readers open an existing ensemble without waiting for a writer
            self._check_compatible(model, indicators)
            return
        with self._lock():
            if self.exists():
                self._check_compatible(model, indicators)
                return
            publish_dir(self.tokenizer_dir(), tokenizer.save_pretrained, replace=True)
            (self.root / "experts").mkdir(exist_ok=True)
            write_json_atomic(
                self.manifest_path,
                {
                    "format": FORMAT,
                    "created": now(),
                    "model": model,
                    "indicators": indicators,
                    "vocab_size": vocab_size,
                    "experts": [],
                },
            )

    def _check_compatible(self, model: dict[str, Any], indicators: dict[str, Any]) -> None:
        current = self.manifest()
        if current["model"]["name"] != model["name"] or current["indicators"] != indicators:
            raise StoreError(
                f"{self.root} already holds an ensemble for model {current['model']['name']!r} "
                f"with indicators {current['indicators']['kind']!r}"
            )

    def commit_expert(
        self,
        name: str,
        write: Callable[[Path], None],
        meta: dict[str, Any],
        memory: QueryMemory,
        record: dict[str, Any],
        shared_rows: tuple[list[int], dict[str, Any]] | None = None,
        after: list[str] | None = None,
    ) -> Path:
        """Write an expert through `write(staging_dir)` and publish it atomically.

        `write` must put the PEFT adapter files into the directory it is given. `meta` goes to
        expert.json, `record` into the manifest's expert list. `shared_rows` (token ids, rows), given
        with the first expert of a shared-rows ensemble, become the ensemble's indicator rows in the
        same manifest update. `after`, when given, is the expert list the new expert was trained
        against (its negatives came from their memories): the commit is refused if the ensemble
        holds others by now.
        """
        validate_expert_name(name)
        with self._lock():
            manifest = self.manifest()
            current = [e["name"] for e in manifest["experts"]]
            if name in current:
                raise StoreError(
                    f"expert {name!r} already exists in {self.root}; experts are never overwritten (use another --name)"
                )
            if after is not None and current != list(after):
                raise StoreError(
                    f"{self.root} changed while expert {name!r} was trained (experts {after} then, {current} "
                    "now): it never saw the new experts' queries as negatives; learn it again"
                )
            final = self.expert_dir(name)

            def write_expert(staging: Path) -> None:
                write(staging)
                missing = [f for f in ADAPTER_FILES if not (staging / f).is_file()]
                if missing:
                    raise StoreError(f"expert {name!r}: adapter files missing after save: {missing}")
                with open(staging / "memory.jsonl", "w", encoding="utf-8") as handle:
                    for item in memory.items:
                        handle.write(json.dumps({"id": item.id, "query": item.query}, ensure_ascii=False) + "\n")
                write_json_atomic(
                    staging / "expert.json",
                    {
                        **meta,
                        "name": name,
                        "task": memory.task,
                        "memory": {"total": memory.total, "size": len(memory.items)},
                    },
                )

            # replace=True: a directory here is an orphan of a crash between rename and manifest update
            publish_dir(final, write_expert, replace=True)
            if shared_rows is not None:
                if manifest.get("indicator_rows"):
                    raise StoreError(f"{self.root} already has shared indicator rows")
                from seecl.see.shared_rows import ROWS_FILE, save_rows

                staging_rows = self.root / f".{ROWS_FILE}.{uuid.uuid4().hex}"
                digest = save_rows(staging_rows, *shared_rows)
                os.replace(staging_rows, self.root / ROWS_FILE)
                manifest["indicator_rows"] = {"file": ROWS_FILE, "digest": digest, "trained_by": name}
            manifest["experts"].append(
                {**record, "name": name, "task": memory.task, "created": now(), "dir": f"experts/{name}"}
            )
            write_json_atomic(self.manifest_path, manifest)
        return final

    def clean_staging(self) -> None:
        """Remove leftovers of interrupted writes by dead writers (never published experts, never
        a live writer's staging: its name carries its pid)."""
        for child in self.root.glob(".rows-*"):
            pid = child.name.split("-")[1] if child.name.count("-") >= 2 else ""
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(child, ignore_errors=True)
        experts = self.root / "experts"
        if experts.is_dir() and self._try_lock():  # a committing writer holds the lock: leave its files
            listed = set(self.expert_names())
            for child in experts.iterdir():
                if not child.name.startswith(".") and child.is_dir() and child.name not in listed:
                    shutil.rmtree(child, ignore_errors=True)  # renamed into place, never listed: a crash
                elif child.name.startswith("."):
                    clean_stale(experts / child.name.split(".")[1])

    def shared_rows(self) -> tuple[list[int], dict[str, Any], str] | None:
        """The ensemble's shared indicator rows (token ids, rows, digest), if it has any."""
        entry = self.manifest().get("indicator_rows") if self.exists() else None
        if not entry:
            return None
        from seecl.see.shared_rows import load_rows

        return (*load_rows(self.root / entry["file"]), entry["digest"])
