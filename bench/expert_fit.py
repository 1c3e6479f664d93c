"""Whether each SEE expert learnt its own routing data: its training negatives and positives, asked alone.

An ensemble misroutes either because an expert never learnt to decline the negatives it was
trained on, or because it declines those but claims other queries of the same tasks. For every
expert of a SEE method of the `seecl bench superni` run in results/superni-mini (`--label`), this
routes through that expert alone (greedy indicator rule, no threshold) the negatives recorded in its
expert.json and the first `--positives` queries of its task's training set, and counts the claims.

    python bench/expert_fit.py --label "SEE(10%)-semantic"    # adds the label to results/bench/expert_fit.json

The ensemble must be on disk (run the benchmark for the label first). Reads only; no timing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, print_table, write_json
from routing import RUN, bench_config


def fit(label: str, n_positives: int) -> dict:
    from seecl.recipes.superni import load_benchmark, load_ood, method_dirname
    from seecl.see.ensemble import SeeEnsemble
    from seecl.serving.engine import RoutingEngine

    root = RUN / "methods" / method_dirname(label) / "ensemble"
    if not (root / "manifest.json").exists():
        raise SystemExit(f'no ensemble at {root}: run `seecl bench superni --methods "{label}"` first')
    ensemble = SeeEnsemble.open(root)
    cfg, _ = bench_config(50)
    tasks, _ = load_benchmark(cfg, ensemble.formatter())
    training = {task.name: task for task in tasks}
    queries_by_id = {inst.id: inst.query for inst in load_ood(cfg)[1].instances}
    for memory in ensemble.store.memories():
        queries_by_id.update({item.id: item.query for item in memory.items})
    result = {}
    for name in ensemble.store.expert_names():
        meta = ensemble.store.expert_meta(name)
        negatives = [(source, queries_by_id[i]) for source, ids in meta.get("negative_ids", {}).items() for i in ids]
        positives = [inst.query for inst in training[meta["task"]].instances[:n_positives]]
        engine = RoutingEngine(ensemble.model, ensemble.formatter(), [name], None, ensemble.config.generate.batch_size)
        routes = engine.route([query for _, query in negatives] + positives)
        claimed = [route.answered_by == name for route in routes]
        by_source = {source: 0 for source, _ in negatives}
        for (source, _), was_claimed in zip(negatives, claimed):
            by_source[source] += was_claimed
        result[name] = {
            "negatives_claimed": sum(claimed[: len(negatives)]),
            "negatives": len(negatives),
            "negatives_claimed_by_source": by_source,
            "positives_claimed": sum(claimed[len(negatives) :]),
            "positives": len(positives),
        }
        print(
            f"{label} {name}: claims {result[name]['negatives_claimed']}/{len(negatives)} of its negatives, "
            f"{result[name]['positives_claimed']}/{len(positives)} of its positives"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", action="append", required=True, help="SEE method label (repeatable)")
    parser.add_argument("--positives", type=int, default=30, help="training queries of the expert's task asked")
    parser.add_argument("--out", default=str(RESULTS / "expert_fit.json"))
    args = parser.parse_args()

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    rows = []
    for label in args.label:
        result[label] = {"positives_asked": args.positives, "experts": fit(label, args.positives)}
        write_json(out, result)
        for name, r in result[label]["experts"].items():
            rows.append(
                [
                    label,
                    name,
                    f"{r['negatives_claimed']}/{r['negatives']}",
                    f"{r['positives_claimed']}/{r['positives']}",
                ]
            )
    print_table(
        "SEE experts on their own training data", ["method", "expert", "negatives claimed", "positives claimed"], rows
    )


if __name__ == "__main__":
    main()
