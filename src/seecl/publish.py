"""Publishing files and directories so that a reader never sees a half-written one.

Owns the write-to-staging, fsync, atomic-rename pattern every writer in seecl uses: JSON files
(`write_json_atomic`) and whole directories (`publish_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def publish_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Create directory `final` through `write(staging)`: nothing named `final` exists until every
    file is on disk. An interrupted write leaves only a hidden `.<name>.<id>.partial` sibling.

    `final` must not exist (a directory cannot be atomically replaced)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
    staging.mkdir()
    try:
        write(staging)
        fsync_tree(staging)
        os.rename(staging, final)  # fails if `final` appeared meanwhile: never merges two writers
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_path(final.parent)
    return final
