"""How routing changes when an ensemble grows: the same SEE method after five tasks and after ten.

The ten-task run (`seecl bench superni --order qa,qg,sa,sum,trans,dsg,expl,para,pe,pos --out
results/superni-10`) learns the five tasks of results/superni-mini first, so the two ensembles
share their first five experts (the adapter cache holds them once). In one run, batch by batch
(`--repeats` interleaved rounds, each side's fastest round per batch counts):

- `small`: the five-expert ensemble routing the dev queries of its five tasks;
- `large_old`: the ten-expert ensemble routing the same queries (five newer experts ask first);
- `large_new`: the ten-expert ensemble routing the dev queries of the five later tasks.

Routing only (answer budget 0): per-query routing latency, the mean number of experts asked per
query (each LoRA check is one prompt pass, so latency should follow it), and routing accuracy on
these queries. Both ensembles route as `seecl serve` does by default, with per-expert calibrated
thresholds (as bench/routing.py and bench/vllm_routing.py do; recorded under `thresholds`), so
their accuracy may differ from the label's own routing F1 (the SEE paper's recipe routes by the
larger of P(pos) and P(neg)), which is read from the runs' summaries (the protocol's final row).
Ensembles missing on disk are rebuilt from the runs' adapter caches.

    python bench/routing_growth.py                  # writes results/bench/routing_growth.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS, ROOT, cpu_model, fastest, interleaved, machine, per_round, print_table, timed, write_json
from routing import ensure_ensemble, workload


def order_of(run: Path) -> list[str]:
    summary = run / "summary.json"
    if not summary.exists():
        raise SystemExit(f"no {summary}: run `seecl bench superni --out {run}` first")
    return json.loads(summary.read_text())["config"]["order"]


def shown(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def routing_f1(run: Path, label: str) -> float | None:
    return json.loads((run / "summary.json").read_text())["methods"].get(label, {}).get("routing_f1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", default=str(ROOT / "results" / "superni-mini"), help="the shorter run")
    parser.add_argument("--large", default=str(ROOT / "results" / "superni-10"), help="the longer run")
    parser.add_argument("--label", default="SEE(10%)", help="SEE method both runs hold")
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "routing_growth.json"))
    args = parser.parse_args()

    from seecl.see.ensemble import SeeEnsemble

    small_run, large_run = Path(args.small), Path(args.large)
    small_tasks, large_tasks = order_of(small_run), order_of(large_run)
    if large_tasks[: len(small_tasks)] != small_tasks or len(large_tasks) <= len(small_tasks):
        raise SystemExit(f"{large_run}'s order {large_tasks} does not extend {small_run}'s {small_tasks}")
    ensembles = {
        "small": SeeEnsemble.open(ensure_ensemble(args.label, args.n_per_task, small_run, small_tasks)),
        "large": SeeEnsemble.open(ensure_ensemble(args.label, args.n_per_task, large_run, large_tasks)),
    }
    queries, _, owners = workload(ensembles["large"].formatter(), args.n_per_task, large_tasks)
    old = [i for i, o in enumerate(owners) if o in small_tasks]
    new = [i for i, o in enumerate(owners) if o not in small_tasks]
    sides = {"small": ("small", old), "large_old": ("large", old), "large_new": ("large", new)}
    batches = {
        side: [chosen[i : i + args.batch_size] for i in range(0, len(chosen), args.batch_size)]
        for side, (_, chosen) in sides.items()
    }
    engines = {name: ens.engine() for name, ens in ensembles.items()}
    for engine in engines.values():
        engine.route(queries[:2])  # warm-up (thread pools, allocator)
    routes: dict[str, dict] = {side: {} for side in sides}

    def measure(side: str):
        name, _ = sides[side]

        def one(item: int) -> float:
            if item >= len(batches[side]):
                return 0.0
            chosen = batches[side][item]
            routed, seconds = timed(lambda: engines[name].route([queries[i] for i in chosen]))
            routes[side].update(zip(chosen, routed))
            return seconds

        return one

    items = max(len(b) for b in batches.values())
    runs = interleaved(items, {side: measure(side) for side in sides}, args.repeats)
    result = {
        "machine": machine(),
        "cpu": cpu_model(),
        "label": args.label,
        "runs": {"small": shown(small_run), "large": shown(large_run)},
        "experts": {name: ens.experts() for name, ens in ensembles.items()},
        "n_per_task": args.n_per_task,
        "batch_size": args.batch_size,
        "rounds": args.repeats,
        "routing_f1": {"small": routing_f1(small_run, args.label), "large": routing_f1(large_run, args.label)},
        "thresholds": {name: ens.thresholds() for name, ens in ensembles.items()},
    }
    for side, (_, chosen) in sides.items():
        seconds = fastest(runs[side])
        result[side] = {
            "queries": len(chosen),
            "seconds_per_query": seconds / len(chosen),
            "seconds_runs": per_round(runs[side]),
            "experts_asked_per_query": statistics.mean(len(routes[side][i].checks) for i in chosen),
            "routing_accuracy": statistics.mean(float(routes[side][i].answered_by == owners[i]) for i in chosen),
        }
    result["latency_ratio_large_over_small"] = (
        result["large_old"]["seconds_per_query"] / result["small"]["seconds_per_query"]
    )
    result["asked_ratio_large_over_small"] = (
        result["large_old"]["experts_asked_per_query"] / result["small"]["experts_asked_per_query"]
    )
    write_json(Path(args.out), result)
    rows = [
        [
            side,
            result[side]["queries"],
            f"{result[side]['seconds_per_query']:.3f}",
            f"{result[side]['experts_asked_per_query']:.2f}",
            f"{result[side]['routing_accuracy']:.3f}",
        ]
        for side in sides
    ]
    print_table(
        f"{args.label}: routing after {len(small_tasks)} and {len(large_tasks)} tasks",
        ["side", "queries", "s/query", "experts asked", "routing accuracy"],
        rows,
    )
    print(
        f"latency x{result['latency_ratio_large_over_small']:.2f} for x{result['asked_ratio_large_over_small']:.2f} "
        f"experts asked; routing F1 {result['routing_f1']['small']} -> {result['routing_f1']['large']}"
    )


if __name__ == "__main__":
    main()
