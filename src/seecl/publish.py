"""Publishing files and directories so that a reader never sees a half-written one.

Owns the write-to-staging, fsync, atomic-rename pattern every writer in seecl uses: JSON files
(`write_json_atomic`) and whole directories (`publish_dir`).
"""

from __future__ import annotations

import json
import os
import uuid
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
