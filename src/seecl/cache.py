"""Trained adapters keyed by everything that produced them, so identical training runs once.

Several methods train identical adapters (every replay baseline's first stage is the same LoRA on
task 1; SEE's first expert is the same for every tau), and a rerun on a new eval split needs no
training at all. An entry is `<root>/<key>/` with the PEFT adapter files and `meta.json`; entries
are published by atomic rename. Extra read-only roots (an earlier run's cache) are searched too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seecl.publish import publish_dir
from seecl.see.store import ADAPTER_FILES


def cache_key(**material: Any) -> str:
    """sha256 over a JSON rendering of the inputs (sorted keys)."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


class AdapterCache:
    def __init__(self, root: str | Path, read_only: list[str | Path] | tuple = ()):
        self.root = Path(root)
        self.read_only = [Path(p) for p in read_only]

    def get(self, key: str) -> Path | None:
        for root in (self.root, *self.read_only):
            entry = root / key
            if all((entry / f).is_file() for f in ADAPTER_FILES) and (entry / "meta.json").is_file():
                return entry
        return None

    def meta(self, key: str) -> dict[str, Any]:
        entry = self.get(key)
        return json.loads((entry / "meta.json").read_text()) if entry else {}

    def put(self, key: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Publish `write(staging_dir)` plus meta.json under `key` (first writer wins)."""
        final = self.root / key

        def write_entry(staging: Path) -> None:
            write(staging)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

        # an entry missing a file (from before entries were published whole) is replaced
        publish_dir(final, write_entry, replace=self.get(key) is None and final.exists())
        return final
