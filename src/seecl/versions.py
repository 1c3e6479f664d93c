"""What `seecl --version` prints: seecl's version and the installed libraries a bug report needs.

Reads package metadata only (importing torch or vLLM would take seconds); does not check that the
versions work together (pyproject.toml and the Makefile pin them).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from seecl import __version__

REPORTED = ("torch", "transformers", "peft", "vllm")


def versions() -> str:
    """seecl's version and the installed versions a bug report needs, read without importing torch."""
    found = []
    for package in REPORTED:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            continue
    return f"seecl {__version__} ({', '.join(found)}; Python {platform.python_version()})"
