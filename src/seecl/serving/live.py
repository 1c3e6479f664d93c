"""An ensemble served while `seecl learn` adds experts to it: what the server asks.

Owns the switch to a grown ensemble. `refresh` (called by the server's worker thread between
batches, never during one) notices a replaced manifest by its stat, loads the new experts' adapters
and builds a backend over them, and only then makes it the one `ask` uses: a batch runs on one
expert list from start to end, and no request sees a half-loaded ensemble. `experts()` is the list
being served (safe to read from any thread). Does not decide what changed on disk (the store) or
how queries are answered (the backend).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from seecl.serving.routing import Answer, Budget, OnToken, Query

log = logging.getLogger("seecl.server")


class LiveEnsemble:
    """A SeeEnsemble behind a server: its backend over the experts loaded so far."""

    def __init__(self, ensemble):
        self.ensemble = ensemble
        self._stamp = ensemble.store.manifest_stamp()
        self._backend = ensemble.backend()  # loads every expert published so far
        self._experts = tuple(self._backend.experts())
        self.reloads = 0

    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def greedy_only(self) -> bool:
        """Whether the backend decodes greedily only (the reference router): the server then
        refuses sampled requests before they join a batch."""
        from seecl.serving.engine import RoutingEngine

        return not isinstance(self._backend, RoutingEngine)

    def refresh(self) -> bool:
        """Serve the experts committed since the last look; whether the expert list changed."""
        stamp = self.ensemble.store.manifest_stamp()
        if stamp == self._stamp:
            return False
        backend = self.ensemble.backend()  # loads new adapters; the current backend serves until it is swapped
        self._stamp = stamp
        experts = tuple(backend.experts())
        changed = experts != self._experts
        # The backend first: a request checked against the new list (experts are only ever added)
        # is answered by this thread, after the swap.
        self._backend = backend
        self._experts = experts
        if changed:
            self.reloads += 1
            log.info("now serving %d experts: %s", len(experts), ", ".join(experts))
        return changed

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget = 64, on_token: OnToken | None = None
    ) -> list[Answer]:
        return self._backend.ask(list(queries), max_new_tokens, on_token)
