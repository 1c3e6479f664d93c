"""Which aLoRA expert settings close the quality gap to LoRA experts, at little inference cost.

aLoRA experts fall behind LoRA experts mostly on the last task of SuperNI-mini (en->es translation),
an adapter that acts only from the assistant header on. This screens settings on that task: for
each seed, an ensemble of SEE(10%)-aLoRA experts for the first four tasks (copied from the SuperNI
runs' adapter caches when they hold them), then one last expert per variant, trained on the same
reconstruction. Each variant is scored as the benchmark's final row would score it: all 250 dev
queries routed through the five experts (the new one is asked first), the last task's ROUGE-L, and
routing F1. The reference variant `lora` is SEE(10%)'s own ensemble of LoRA experts (from the same
adapter caches), scored the same way in the same run; every row reports its gap to it.

The variant `routers` trains nothing: the `base` variant's aLoRA experts route (every check in one
forward), and the `lora` ensemble's expert of the chosen name answers (`serving.routed_by`). With
`--all-tasks` every task's queries are answered, not only the last task's, and the row also reports
the final row's mean over tasks (AR as the benchmark computes it); those rows are kept apart
(`seed0/lora@all`), since their routing changes every task's answers.

    python bench/alora_quality.py --seeds 0 --variants lora,base,r16,all_linear
    python bench/alora_quality.py --seeds 0,1,2 --variants base,all_linear   # resumes per (seed, variant)
    python bench/alora_quality.py --seeds 0 --variants lora,routers --all-tasks

Writes results/bench/alora_quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, RESULTS, ROOT, machine, print_table, write_json

REFERENCE = "lora"  # every expert a plain LoRA expert: what the aLoRA variants are measured against
ROUTERS = "routers"  # the `base` variant's experts route, the reference's answer: nothing is trained
VARIANTS = {
    REFERENCE: [],
    "base": [],
    "last_token": ["adapter.alora_invocation=last_token"],
    "r16": ["adapter.r=16", "adapter.alpha=32"],
    "all_linear": ["adapter.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
    "qkvo": ["adapter.targets=[q_proj,k_proj,v_proj,o_proj]"],
    "lr1e-3": ["train.lr=1e-3"],
    "epochs6": ["train.epochs=6"],
}
OUT = RESULTS / "alora_quality.json"
WORK = ROOT / "runs" / "alora_quality"
SEED_RUNS = {0: "superni-mini", 1: "superni-mini-seed1", 2: "superni-mini-seed2"}


def run_config(seed: int, extra: list[str], alora: bool = True):
    from seecl.config import RunConfig, from_dict, merge_overrides, to_dict
    from seecl.methods.registry import SEE_PAPER, SEE_VARIANTS
    from seecl.recipes.superni import BENCH_OVERRIDES

    overrides = BENCH_OVERRIDES + SEE_PAPER + (SEE_VARIANTS["aLoRA"] if alora else []) + ["see.tau=0.1"]
    overrides += ["train.progress=false"]
    overrides += [f"train.seed={seed}", f"see.seed={seed}", "train.checkpoint_every=25", *extra]
    return from_dict(RunConfig, merge_overrides(to_dict(RunConfig()), overrides))


def evaluate(backend, evals, all_tasks: bool = False) -> dict:
    """Route all dev queries through `backend` and score the last task's answers (every task's
    with `all_tasks`, adding `per_task` and their mean, `final_row_mean`)."""
    from seecl.evaluation.metrics import confusion, mean, rouge_l, routing_prf_from_counts

    queries, owners, budgets = [], [], []
    for name, eval_set in evals.items():
        for inst in eval_set.task.instances:
            queries.append(inst.query)
            owners.append(name)
            budgets.append(eval_set.budget)
    last = list(evals)[-1]
    if not all_tasks:
        budgets = [b if o == last else 0 for b, o in zip(budgets, owners)]  # only the last task's answers change
    answers = backend.ask(queries, budgets)
    routed = [a.route.answered_by for a in answers]
    names = list(evals)
    counts = confusion(owners, routed, names, names)
    prf = routing_prf_from_counts(counts, names, names + ["base"])

    def score(task: str) -> float:
        scored = [a for a, o in zip(answers, owners) if o == task]
        instances = evals[task].task.instances
        return mean([rouge_l(a.text, inst.references, evals[task].language) for a, inst in zip(scored, instances)])

    measured = {
        "last_task": last,
        "rouge_l": score(last),
        "routing_f1": mean([v["f1"] for v in prf.values()]),
        "last_task_recall": prf[last]["recall"],
        "claims_of_other_tasks": sum(1 for o, r in zip(owners, routed) if r == last and o != last),
    }
    if all_tasks:
        measured["per_task"] = {task: score(task) for task in names}
        measured["final_row_mean"] = mean(list(measured["per_task"].values()))
    return measured


def ensemble_for(seed: int, variant: str, tasks, cache):
    """The variant's ensemble of SEE(10%) experts (learned, or taken from `cache`) and the last
    expert's training record; greedy indicators, as the benchmark's SEE(10%) rows route."""
    from seecl.see.ensemble import SeeEnsemble

    alora = variant != REFERENCE
    ensemble = SeeEnsemble(WORK / f"seed{seed}" / variant, run_config(seed, [], alora))
    for task in tasks[:-1]:
        if task.name not in ensemble.experts():
            ensemble.learn(task, cache=cache)  # the first four experts: shared by every variant
    ensemble.config = run_config(seed, VARIANTS[variant], alora)
    if tasks[-1].name not in ensemble.experts():
        record = ensemble.learn(tasks[-1], cache=cache)
    else:
        record = ensemble.store.records()[-1]
    ensemble.config = run_config(seed, VARIANTS[variant] + ["see.calibrate=false"], alora)
    ensemble._engine = None
    return ensemble, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="base,r16,all_linear")
    parser.add_argument("--redo", action="store_true", help="measure again what the JSON already holds")
    parser.add_argument("--all-tasks", action="store_true", help="answer and score every task, not only the last")
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="another SuperNI run directory whose adapter cache may hold the first experts",
    )
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - {*VARIANTS, ROUTERS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join([*VARIANTS, ROUTERS])}")

    from seecl.cache import AdapterCache
    from seecl.data.prompts import PromptFormatter
    from seecl.model.base import load_tokenizer
    from seecl.recipes.superni import BenchConfig, load_benchmark
    from seecl.serving.routed_by import RoutedBy

    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    results["machine"] = machine()
    for seed in [int(s) for s in args.seeds.split(",")]:
        bench = BenchConfig(data_dir=str(DATA / "superni"), ood_file=str(DATA / "ood" / "lima.dev.jsonl"))
        base_config = run_config(seed, [])
        formatter = PromptFormatter(load_tokenizer(base_config.model), None, base_config.model.system_prompt)
        tasks, evals = load_benchmark(bench, formatter)
        caches = [ROOT / "results" / run / "cache" for run in SEED_RUNS.values()]
        caches += [Path(run) / "cache" for run in args.reuse]
        cache = AdapterCache(WORK / "cache", caches)
        for variant in args.variants.split(","):
            key = f"seed{seed}/{variant}" + ("@all" if args.all_tasks else "")
            if key in results["runs"] and not args.redo:
                continue
            started = time.perf_counter()
            if variant == ROUTERS:
                router, record = ensemble_for(seed, "base", tasks, cache)
                answerer, answering = ensemble_for(seed, REFERENCE, tasks, cache)
                backend = RoutedBy(router.engine(), answerer.engine())
                parameters = record["trainable_parameters"] + answering["trainable_parameters"]
            else:
                backend, record = ensemble_for(seed, variant, tasks, cache)
                parameters = record["trainable_parameters"]
            measured = evaluate(backend, evals, args.all_tasks)
            measured.update(
                variant=variant,
                overrides=VARIANTS.get(variant, []),
                seed=seed,
                trainable_parameters=parameters,
                minutes=round((time.perf_counter() - started) / 60, 1),
            )
            results["runs"][key] = measured
            write_json(OUT, results)
            print(key, measured, flush=True)
    rows = []
    for key, r in sorted(results["runs"].items()):
        reference = results["runs"].get(f"seed{r['seed']}/{REFERENCE}" + ("@all" if key.endswith("@all") else ""))
        gap = None if reference is None else round(r["rouge_l"] - reference["rouge_l"], 1)
        mean_row = r.get("final_row_mean")
        mean_gap = None if mean_row is None or reference is None else round(mean_row - reference["final_row_mean"], 2)
        rouge, f1 = round(r["rouge_l"], 1), round(r["routing_f1"], 3)
        mean_row = None if mean_row is None else round(mean_row, 2)
        cells = [key, rouge, gap, mean_row, mean_gap, f1, r["claims_of_other_tasks"], r["trainable_parameters"]]
        rows.append(["–" if cell is None else cell for cell in cells])
    print_table(
        "aLoRA variants: the last task (and with --all-tasks the final row's mean)",
        ["seed/variant", "ROUGE-L", "vs LoRA", "row mean", "vs LoRA", "routing F1", "claims of others", "params"],
        rows,
    )


if __name__ == "__main__":
    main()
