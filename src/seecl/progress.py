"""Progress of long evaluations: a bar with counts and ETA that the code doing the work advances.

The evaluation protocol opens a bar for each scored cell (`tracking`); the engine and the decoding
loops report each finished batch through `advance`, whoever called them, without knowing about
bars. Outside `tracking` (a server, a library call) `advance` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_bar: contextvars.ContextVar = contextvars.ContextVar("seecl_progress", default=None)


def make_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="query", disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def tracking(total: int, desc: str, enabled: bool = True) -> Iterator[None]:
    bar = make_bar(total, desc, enabled)
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        bar.close()


def advance(n: int) -> None:
    bar = _bar.get()
    if bar is not None:
        bar.update(n)
