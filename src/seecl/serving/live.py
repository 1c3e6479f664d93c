"""An ensemble served while `seecl learn` adds experts to it: what the server asks.

Owns the switch to a grown ensemble. `refresh` (called by the server's worker thread between
batches, never during one) notices a replaced manifest by its stat, loads the new experts' adapters
and builds a backend over them, and only then makes it the one `ask` uses: a batch runs on one
expert list from start to end, and no request sees a half-loaded ensemble. `experts()` is the list
being served (safe to read from any thread). With a `router` ensemble (`RoutedBy`: its experts
route, the served ensemble's answer) both manifests are watched, and a grown pair is served only once
both hold the same experts: between one's new expert and the other's, the old pair goes on serving.
Does not decide what changed on disk (the store) or how queries are answered (the backend).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from seecl.errors import ConfigError
from seecl.serving.routed_by import RoutedBy
from seecl.serving.routing import Answer, Budget, OnToken, Query

log = logging.getLogger("seecl.server")


class LiveEnsemble:
    """A SeeEnsemble behind a server: its backend over the experts loaded so far (routed by
    `router`'s experts, when given)."""

    def __init__(self, ensemble, router=None):
        self.ensemble, self.router = ensemble, router
        self._stamp = self._stamps()
        self._backend = self._build()  # loads every expert published so far
        self._experts = tuple(self._backend.experts())  # a pair that differs is refused here
        self.reloads = 0
        self._waiting = None  # the stamps of a pair that differed when last looked at

    def _stamps(self):
        return [e.store.manifest_stamp() for e in (self.ensemble, self.router) if e is not None]

    def _build(self):
        if self.router is None:
            return self.ensemble.backend()
        return RoutedBy(self.router.backend(), self.ensemble.backend())

    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def greedy_only(self) -> bool:
        """Whether the backend that answers decodes greedily only (the reference router): the
        server then refuses sampled requests before they join a batch."""
        from seecl.serving.engine import RoutingEngine

        return not isinstance(getattr(self._backend, "answerer", self._backend), RoutingEngine)

    def refresh(self) -> bool:
        """Serve the experts committed since the last look; whether the expert list changed."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        backend = self._build()  # loads new adapters; the current backend serves until it is swapped
        try:
            experts = tuple(backend.experts())
        except ConfigError as exc:  # one of the pair has a new expert the other has not learned yet
            if self._waiting != stamp:
                self._waiting = stamp
                log.info("still serving %s: %s", ", ".join(self._experts), exc)
            return False
        self._stamp = stamp
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
