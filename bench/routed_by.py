"""What routing with aLoRA experts and answering with LoRA experts costs (`seecl serve --routers`).

Workload: bench/routing.py's, the SuperNI dev queries of the five tasks (`--n-per-task` each) with
each task's answer budget, batches of 16, answered by the ensembles of two `seecl bench superni`
methods of results/superni-mini: `--label` (LoRA experts, default SEE(10%)) and `--router-label`
(aLoRA experts of the same tasks, default SEE(10%)-aLoRA). In one run, batch by batch, `--repeats`
rounds, each side's fastest round per batch:

- lora: the LoRA ensemble's engine, routed and answered by its experts (one prompt pass per expert
  asked);
- pair: the aLoRA experts route (the base prefills the body once, every check in one forward) and
  the LoRA expert they choose answers (`serving.routed_by.RoutedBy`);
- alora: the aLoRA ensemble's engine alone, routing and answering;
- single: the LoRA ensemble's newest expert answering every query directly through the same engine,
  decoding as many tokens as the pair's answers took: the cost of one model with no routing.

Reports queries/s per side, each routed side's time over the single model's, and how many of the
pair's routes and greedy answers equal the LoRA ensemble's own.

    python bench/routed_by.py               # writes results/bench/routed_by.json
"""

from __future__ import annotations

import argparse

from common import RESULTS, fastest, interleaved, machine, per_round, print_table, timed, write_json
from routing import answer_tokens, ensure_ensemble, workload

OUT = RESULTS / "routed_by.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="SEE(10%)", help="the method whose LoRA experts answer")
    parser.add_argument("--router-label", default="SEE(10%)-aLoRA", help="the method whose aLoRA experts route")
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from seecl.see.ensemble import SeeEnsemble
    from seecl.serving.prefix_cache import PrefixCache, batch_order
    from seecl.serving.routed_by import RoutedBy

    # Both as `seecl serve` routes by default: the thresholds each ensemble stores.
    lora = SeeEnsemble.open(ensure_ensemble(args.label, args.n_per_task), ["generate.batch_size=16"])
    alora = SeeEnsemble.open(ensure_ensemble(args.router_label, args.n_per_task), ["generate.batch_size=16"])
    queries, budgets, owners = workload(lora.formatter(), args.n_per_task)
    lora_engine, alora_engine = lora.engine(), alora.engine()
    pair = RoutedBy(alora_engine, lora_engine)
    pair.experts()  # the same tasks in the same order, or a clear error before anything is timed
    for engine in (lora_engine, alora_engine):
        engine.ask(queries[:2], 2)  # warm-up (thread pools, allocator)
    prompts = [lora.formatter().prompt_ids(q) for q in queries]
    order = batch_order(prompts, lora_engine.prefix_cache.block)
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]

    def fresh(engine) -> PrefixCache:
        return PrefixCache(engine.prefix_cache.max_tokens, engine.prefix_cache.block)

    # each side keeps its own prefix caches (one per engine), emptied at every round
    caches = {side: (fresh(lora_engine), fresh(alora_engine)) for side in ("lora", "pair", "alora", "single")}
    answers: dict[str, dict] = {side: {} for side in caches}

    def side(name: str, backend):
        def measure(item: int) -> float:
            lora_engine.prefix_cache, alora_engine.prefix_cache = caches[name]
            chosen = batches[item]
            got, seconds = timed(lambda: backend.ask([queries[i] for i in chosen], [budgets[i] for i in chosen]))
            answers[name].update(zip(chosen, got))
            return seconds

        return measure

    pos = list(lora.base.indicators.pos_ids)
    newest = lora.experts()[-1]

    def single(item: int) -> float:
        lora_engine.prefix_cache = caches["single"][0]
        chosen = batches[item]
        lengths = answer_tokens(lora, [answers["pair"][i] for i in chosen])
        steps = [min(n + 1, budgets[i]) for n, i in zip(lengths, chosen)]
        return timed(
            lambda: lora_engine.generate(newest, [queries[i] for i in chosen], steps, forced=pos, ignore_eos=True)
        )[1]

    measures = {"lora": side("lora", lora_engine), "pair": side("pair", pair), "alora": side("alora", alora_engine)}
    measures["single"] = single
    runs = interleaved(
        len(batches), measures, args.repeats, lambda: [c.clear() for two in caches.values() for c in two]
    )
    seconds = {name: fastest(runs[name]) for name in measures}
    indices = range(len(queries))
    result = {
        "machine": machine(),
        "label": args.label,
        "router_label": args.router_label,
        "experts": lora.experts(),
        "queries": len(queries),
        "batch_size": 16,
        "rounds": args.repeats,
        "qps": {name: len(queries) / s for name, s in seconds.items()},
        "seconds": seconds,
        "seconds_runs": {name: per_round(runs[name]) for name in measures},
        "over_single": {name: seconds[name] / seconds["single"] for name in ("lora", "pair", "alora")},
        "routing_accuracy": {
            name: sum(answers[name][i].route.answered_by == owners[i] for i in indices) / len(queries)
            for name in ("lora", "pair", "alora")
        },
        "pair_routes_equal_lora": sum(
            answers["pair"][i].route.answered_by == answers["lora"][i].route.answered_by for i in indices
        ),
        "pair_answers_equal_lora": sum(answers["pair"][i].text == answers["lora"][i].text for i in indices),
    }
    write_json(OUT, result)
    rows = [
        [name, round(result["qps"][name], 3), round(result["over_single"].get(name, 1.0), 2)]
        + [round(result["routing_accuracy"].get(name, float("nan")), 3)]
        for name in ("lora", "pair", "alora", "single")
    ]
    print_table(
        "Routing with aLoRA experts, answering with LoRA experts",
        ["side", "queries/s", "x single", "routed to own"],
        rows,
    )
    print(
        f"the pair equals the LoRA ensemble on {result['pair_routes_equal_lora']} routes "
        f"and {result['pair_answers_equal_lora']} answers of {len(queries)}"
    )


if __name__ == "__main__":
    main()
