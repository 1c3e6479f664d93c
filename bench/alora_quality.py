"""Which aLoRA expert settings close the quality gap to LoRA experts, at little inference cost.

aLoRA experts fall behind LoRA experts mostly on the last task of SuperNI-mini (en->es translation),
an adapter that acts only from the assistant header on. This screens settings on that task: for
each seed, an ensemble of SEE(10%)-aLoRA experts for the first four tasks (copied from the SuperNI
runs' adapter caches when they hold them), then one last expert per variant, trained on the same
reconstruction. Each variant is scored as the benchmark's final row would score it: all 250 dev
queries routed through the five experts (the new one is asked first), the last task's ROUGE-L, and
routing F1. The reference variant `lora` is SEE(10%)'s own ensemble of LoRA experts (from the same
adapter caches), scored the same way in the same run; every row reports its gap to it.

    python bench/alora_quality.py --seeds 0 --variants lora,base,r16,all_linear
    python bench/alora_quality.py --seeds 0,1,2 --variants base,all_linear   # resumes per (seed, variant)

Writes results/bench/alora_quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DATA, RESULTS, ROOT, machine, print_table, write_json

REFERENCE = "lora"  # every expert a plain LoRA expert: what the aLoRA variants are measured against
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


def evaluate(ensemble, evals) -> dict:
    from seecl.evaluation.metrics import confusion, mean, rouge_l, routing_prf_from_counts

    queries, owners, budgets = [], [], []
    for name, eval_set in evals.items():
        for inst in eval_set.task.instances:
            queries.append(inst.query)
            owners.append(name)
            budgets.append(eval_set.budget)
    last = list(evals)[-1]
    budgets = [b if o == last else 0 for b, o in zip(budgets, owners)]  # only the last task's answers change
    answers = ensemble.ask(queries, budgets)
    routed = [a.route.answered_by for a in answers]
    names = list(evals)
    counts = confusion(owners, routed, names, names)
    prf = routing_prf_from_counts(counts, names, names + ["base"])
    scores = [
        rouge_l(a.text, inst.references, evals[last].language)
        for a, inst in zip([a for a, o in zip(answers, owners) if o == last], evals[last].task.instances)
    ]
    return {
        "last_task": last,
        "rouge_l": mean(scores),
        "routing_f1": mean([v["f1"] for v in prf.values()]),
        "last_task_recall": prf[last]["recall"],
        "claims_of_other_tasks": sum(1 for o, r in zip(owners, routed) if r == last and o != last),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="base,r16,all_linear")
    parser.add_argument("--redo", action="store_true", help="measure again what the JSON already holds")
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="another SuperNI run directory whose adapter cache may hold the first experts",
    )
    args = parser.parse_args()

    from seecl.cache import AdapterCache
    from seecl.data.prompts import PromptFormatter
    from seecl.model.base import load_tokenizer
    from seecl.recipes.superni import BenchConfig, load_benchmark
    from seecl.see.ensemble import SeeEnsemble

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
            key = f"seed{seed}/{variant}"
            if key in results["runs"] and not args.redo:
                continue
            started = time.perf_counter()
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
            measured = evaluate(ensemble, evals)
            measured.update(
                variant=variant,
                overrides=VARIANTS[variant],
                seed=seed,
                trainable_parameters=record["trainable_parameters"],
                minutes=round((time.perf_counter() - started) / 60, 1),
            )
            results["runs"][key] = measured
            write_json(OUT, results)
            print(key, measured, flush=True)
    rows = []
    for key, r in sorted(results["runs"].items()):
        reference = results["runs"].get(f"seed{r['seed']}/{REFERENCE}")
        gap = None if reference is None else round(r["rouge_l"] - reference["rouge_l"], 1)
        rouge, f1 = round(r["rouge_l"], 1), round(r["routing_f1"], 3)
        rows.append([key, rouge, gap, f1, r["claims_of_other_tasks"], r["trainable_parameters"]])
    print_table(
        "aLoRA variants on the last task",
        ["seed/variant", "ROUGE-L", "vs LoRA", "routing F1", "claims of others", "trainable params"],
        rows,
    )


if __name__ == "__main__":
    main()
