"""Route with one ensemble's experts and answer with another's: activated-LoRA checks in front of
LoRA answers.

An aLoRA expert's check reads a body the base prefilled once, so asking every expert costs little
more than asking one (`alora_batch`); its answers, though, trail those of a LoRA expert trained on
the same data (docs/benchmarks.md, "aLoRA experts"). `RoutedBy` pairs two ensembles that learned the
same tasks: the router's experts decide who answers (its thresholds, its walk, its route, which the
answer carries), and the answerer's expert of that name answers after its `<<pos>>`, exactly as it
would had it claimed the query itself (`Query.owner`). Where the two ensembles route alike, the
answers are the answerer's own; what is paid is one more prompt pass (the answering expert's) per
answered query and both ensembles in memory.

Owns the composition only: each side is a complete backend (the engine, the reference router or a
SeeEnsemble), and a query that names its owner goes to the answerer without routing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from seecl.errors import ConfigError
from seecl.serving.routing import (
    Answer,
    Budget,
    Delta,
    OnToken,
    Query,
    Route,
    RoutingBackend,
    as_query,
    routes_with_owners,
)


class RoutedBy:
    """A RoutingBackend whose routes are `router`'s and whose answers are `answerer`'s."""

    def __init__(self, router: RoutingBackend, answerer: RoutingBackend):
        self.router = router
        self.answerer = answerer

    def experts(self) -> list[str]:
        """The experts both sides hold, oldest first; refused when they differ, since a query the
        router sends to an expert the answerer lacks could not be answered, and an expert only the
        answerer holds would never be asked."""
        routing, answering = self.router.experts(), self.answerer.experts()
        if routing != answering:
            raise ConfigError(
                f"the router's experts {routing} and the answerer's {answering} differ: both ensembles "
                "must have learned the same tasks in the same order"
            )
        return routing

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        self.experts()
        return self.router.route(list(queries))

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget = 64, on_token: OnToken | None = None
    ) -> list[Answer]:
        asked = [as_query(q) for q in queries]
        routes = routes_with_owners(asked, self.experts(), self.router.route)
        owned = [dataclasses.replace(q, owner=route.answered_by) for q, route in zip(asked, routes)]

        def with_route(index: int, answer: Answer) -> Answer:
            return dataclasses.replace(answer, query=queries[index], route=routes[index])

        forward = None
        if on_token is not None:

            def forward(index: int, delta: Delta):
                if delta.answer is not None:
                    delta = dataclasses.replace(delta, answer=with_route(index, delta.answer))
                return on_token(index, delta)

        answers = self.answerer.ask(owned, max_new_tokens, forward)
        return [with_route(index, answer) for index, answer in enumerate(answers)]
