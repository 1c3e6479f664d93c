"""Routing cost: the naive sequential process, the fast engine, and one LoRA model on the same queries.

Workload: the SuperNI eval queries of the benchmark's five tasks (`--n-per-task` per task from the
dev split, answer budgets from each task's training references), answered by the experts of a SEE
method of the `seecl bench superni` run in results/superni-mini (`--label`, default SEE(10%)) and,
for the aLoRA rows, of `--alora-label` (default SEE(10%)-aLoRA). An ensemble that is not on disk is
learned through the method: experts held by the run's adapter cache are copied, others trained.
In one run:

- naive: `routing.SequentialRouter` one query at a time (a full prompt pass per expert, then a
  fresh generation pass) on an even sample of `--naive-queries` -> queries/s;
- engine: `engine.RoutingEngine` over the same queries, batch 16 -> queries/s, `speedup_vs_naive`;
- single: the newest expert answering every query through the same engine, no routing, decoding
  exactly as many tokens as the routed answer (equal decoding work) ->
  `overhead_measured` = engine time / single time - 1;
- the cost model TTFT*(M-1)/2 / (TTFT + TPOT*N) from TTFT (one prompt pass) and TPOT (one decode
  step) of the single model, each the mean over every batch of the workload: at the engine's
  batch size with its batches' TTFT, TPOT and longest answers (`cost_model_unsimplified_eq8_batch`, to compare
  with `overhead_measured`: a batch shares its decoding steps while every LoRA check stays a
  compute-bound prompt pass).

All of them are measured batch by batch: the engine routes and answers a batch, the single model
answers it, the naive process answers its share of the sample, the TTFT/TPOT probe runs on it, then
the next batch; `--repeats` rounds of that. A slow spell of the shared machine (the same batch has
taken anywhere from 13 to 21 s on it) so falls on every side of the batches it spans instead of on
one side's whole run, and each side's fastest round per batch counts (every round's total is
recorded too). Further parts:

- one query at a time, the paper's regime: engine and single model at batch 1 on the naive
  process's sample -> `overhead_batch1`, against the cost model from batch-1 TTFT, TPOT and the
  mean answer length (`cost_model_unsimplified_eq8`);
- memory (bench/routing_scale.py): RSS after attaching 0, 1, 10, 100 randomly initialised LoRA
  experts -> `mb_per_expert`;
- routing latency vs number of experts (bench/routing_scale.py; 1..64, random LoRA or aLoRA experts, every verdict
  counted as a decline, so every expert is asked): plotted to results/bench/routing_latency.png;
- quality: AR of `--alora-label` against its LoRA counterpart in results/superni-mini and every
  results/superni-mini-seed* run holding both (`alora_ar`, read from their summaries, not measured
  here), and every target with its bound (`targets`).

    python bench/routing.py                 # writes results/bench/routing.json

Resumable: every finished part (lora, alora, memory, latency_vs_experts) is written at once, with
the processor it ran on (`cpu`), and kept by the next run with the same workload; `--redo`
measures everything again, `--redo lora lora_batch1` only the parts named.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import (
    DATA,
    RESULTS,
    ROOT,
    cpu_model,
    fastest,
    interleaved,
    machine,
    per_round,
    print_table,
    timed,
    write_json,
)
from routing_scale import latency_curve, memory_in_fresh_process, plot

TASKS = ["qa", "qg", "sa", "sum", "trans"]
RUN = ROOT / "results" / "superni-mini"  # the `seecl bench superni` run whose experts are timed


def bench_config(n_per_task: int, run: Path = RUN, tasks: list[str] = TASKS):
    """A SuperNI run's benchmark settings (its summary.json), read from this machine's data copy."""
    from seecl.config import from_dict
    from seecl.recipes.superni import BenchConfig

    recorded = json.loads((run / "summary.json").read_text())["config"] if (run / "summary.json").exists() else {}
    fields = {k: v for k, v in recorded.items() if k in BenchConfig.__dataclass_fields__}
    cfg = from_dict(BenchConfig, {**fields, "order": tasks, "n_eval": n_per_task})
    cfg.data_dir = str(DATA / "superni")
    cfg.ood_file = str(DATA / "ood" / Path(cfg.ood_file).name)
    return cfg, recorded.get("run_config")


def workload(formatter, n_per_task: int, tasks: list[str] = TASKS):
    """Every eval query of the tasks, its task's answer budget, and the task it belongs to."""
    from seecl.recipes.superni import load_benchmark

    _, evals = load_benchmark(bench_config(n_per_task, tasks=tasks)[0], formatter)
    queries, budgets, owners = [], [], []
    for name in tasks:
        for inst in evals[name].task.instances:
            queries.append(inst.query)
            budgets.append(evals[name].budget)
            owners.append(name)
    return queries, budgets, owners


def ensure_ensemble(label: str, n_per_task: int, run: Path = RUN, tasks: list[str] = TASKS) -> Path:
    """The ensemble of `label` from a SuperNI run; when absent or incomplete (an interrupted
    run) it is learned through the method, which keeps the experts already published, copies
    every expert the run's adapter cache holds and trains only the others."""
    from seecl.cache import AdapterCache
    from seecl.config import RunConfig, from_dict
    from seecl.data.prompts import PromptFormatter
    from seecl.methods.base import MethodContext
    from seecl.methods.registry import build_method
    from seecl.model.base import load_base
    from seecl.recipes.superni import load_benchmark, load_ood, method_dirname
    from seecl.see.store import EnsembleStore

    workdir = run / "methods" / method_dirname(label)
    store = EnsembleStore(workdir / "ensemble")
    if store.exists() and store.expert_names() == tasks:
        return store.root
    cfg, recorded = bench_config(n_per_task, run, tasks)
    if recorded is None:
        raise SystemExit(f"no {run / 'summary.json'}: run `seecl bench superni` first")
    run_config = from_dict(RunConfig, recorded)
    base = load_base(run_config.model)
    tasks, _ = load_benchmark(cfg, PromptFormatter(base.tokenizer, None, run_config.model.system_prompt))
    del base
    _, general = load_ood(cfg)
    ctx = MethodContext(
        run_config, workdir, AdapterCache(run / "cache"), general, general_negatives=cfg.general_negatives
    )
    method = build_method(label, ctx)
    for stage in range(len(tasks)):
        print(f"{label}: expert {tasks[stage].name}: {method.learn(tasks[: stage + 1])}")
    method.close()
    return workdir / "ensemble"


def ttft_tpot(engine, owner: str, prompts: list[list[int]], steps: int = 16) -> tuple[float, float]:
    """Seconds of one prompt pass over a batch (the engine's chunked prefill, no prefix cache) and
    of one decode step of that batch (the mean of `steps`) by the single model `owner`: the TTFT
    and TPOT of the cost model at that batch size."""
    import torch

    from seecl.serving.engine import PrefixCache

    cache, engine.prefix_cache = engine.prefix_cache, PrefixCache(0)
    try:
        with torch.inference_mode(), engine._use(owner):
            (state, logprobs), first = timed(lambda: engine._prefill(owner, prompts, 1, room=steps))
            step_seconds = []
            for _ in range(steps):
                tokens = logprobs[:, -1].argmax(-1).tolist()
                (state, logprobs), dt = timed(lambda: engine._extend(state, [[t] for t in tokens], 1))
                step_seconds.append(dt)
    finally:
        engine.prefix_cache = cache
    return first, statistics.mean(step_seconds)


def routing_added_latency(ttft: float, experts: int) -> float:
    """Eq. 8's numerator: what routing adds, TTFT*(M-1)/2 (half the other experts' prompt passes)."""
    return ttft * (experts - 1) / 2


def single_model_latency(ttft: float, tpot: float, answer_tokens: float) -> float:
    """Eq. 8's denominator: one model answering, TTFT + TPOT*N."""
    return ttft + tpot * answer_tokens


def cost_model(ttft: float, tpot: float, experts: int, answer_tokens: float) -> float:
    """Extra latency of routing over one model: TTFT*(M-1)/2 / (TTFT + TPOT*N) (Appendix E, unsimplified)."""
    return routing_added_latency(ttft, experts) / single_model_latency(ttft, tpot, answer_tokens)


PARTS = ("lora", "lora_batch1", "alora", "alora_batch1", "memory", "latency_vs_experts")


def naive_sample(total: int, limit: int) -> list[int]:
    """An even sample of the workload (every task represented), for the one-query-at-a-time timings."""
    return list(range(0, total, max(1, total // limit)))[:limit]


def answer_tokens(ens, answers) -> list[int]:
    formatter = ens.formatter()
    return [len(formatter.text_ids(a.text)) for a in answers]


def routed_and_single(ens, engine, queries, budgets, batches: list[list[int]], caches: dict, answers: dict):
    """The two measures every comparison pairs on a batch of query indices: the routed engine, and
    the newest expert answering the same queries directly through the same engine, decoding
    exactly as many tokens as each routed answer took (its length plus the end token), so both
    sides do the same decoding. Each side keeps its own prefix cache (`caches`)."""
    pos = list(ens.base.indicators.pos_ids)

    def engine_side(item: int) -> float:
        engine.prefix_cache = caches["engine"]
        chosen = batches[item]
        routed, seconds = timed(lambda: engine.ask([queries[i] for i in chosen], [budgets[i] for i in chosen]))
        answers.update(zip(chosen, routed))
        return seconds

    def single_side(item: int) -> float:
        engine.prefix_cache = caches["single"]
        chosen = batches[item]
        lengths = answer_tokens(ens, [answers[i] for i in chosen])
        steps = [min(n + 1, budgets[i]) for n, i in zip(lengths, chosen)]
        return timed(
            lambda: engine.generate(ens.experts()[-1], [queries[i] for i in chosen], steps, forced=pos, ignore_eos=True)
        )[1]

    return {"engine": engine_side, "single": single_side}


def compare(ensemble_dir: Path, queries, budgets, owners, label: str, sample: list[int], repeats: int) -> dict:
    """naive vs engine vs single model on one trained ensemble, batch by batch."""
    from seecl.see.ensemble import SeeEnsemble
    from seecl.serving.prefix_cache import PrefixCache, batch_order

    ens = SeeEnsemble.open(ensemble_dir, ["generate.batch_size=16"])
    experts = ens.experts()
    engine = ens.engine()
    router = ens.router()
    engine.ask(queries[:2], 2)  # warm-up (thread pools, allocator)
    # Batches as the engine cuts them (the cost model in that regime: a batch decodes until its
    # longest answer is done). The naive process answers one query at a time, timed on an even
    # sample of the queries, spread over the batches so that it runs beside them.
    prompts = [ens.formatter().prompt_ids(q) for q in queries]
    order = batch_order(prompts, engine.prefix_cache.block)
    batches = [order[i : i + engine.batch_size] for i in range(0, len(order), engine.batch_size)]
    naive_parts = [
        sample[len(sample) * b // len(batches) : len(sample) * (b + 1) // len(batches)] for b in range(len(batches))
    ]
    caches = {
        "engine": PrefixCache(engine.prefix_cache.max_tokens, engine.prefix_cache.block),
        "single": PrefixCache(engine.prefix_cache.max_tokens, engine.prefix_cache.block),
    }
    answers: dict = {}
    measures = routed_and_single(ens, engine, queries, budgets, batches, caches, answers)
    measures["naive"] = lambda item: timed(lambda: [router.ask([queries[i]], budgets[i]) for i in naive_parts[item]])[1]
    measures["ttft_tpot"] = lambda item: ttft_tpot(engine, experts[-1], [prompts[i] for i in batches[item]])
    runs = interleaved(len(batches), measures, repeats, lambda: [cache.clear() for cache in caches.values()])
    engine_s, single_s, naive_s = fastest(runs["engine"]), fastest(runs["single"]), fastest(runs["naive"])
    routed = sum(answers[i].route.answered_by == o for i, o in enumerate(owners)) / len(owners)
    lengths = answer_tokens(ens, [answers[i] for i in range(len(queries))])
    ttft_b = statistics.mean(min(t for t, _ in rounds) for rounds in runs["ttft_tpot"])
    tpot_b = statistics.mean(min(s for _, s in rounds) for rounds in runs["ttft_tpot"])
    n_b = statistics.mean(max(lengths[i] for i in b) + 1 for b in batches)
    naive_qps = len(sample) / naive_s
    row = {
        "experts": experts,
        "thresholds": ens.thresholds(),  # as `seecl serve` routes by default
        "queries": len(queries),
        "routing_accuracy": routed,
        "naive_queries": len(sample),
        "naive_qps": naive_qps,
        "engine_qps": len(queries) / engine_s,
        "single_qps": len(queries) / single_s,
        "engine_seconds": engine_s,
        "single_seconds": single_s,
        "naive_seconds": naive_s,
        "rounds": repeats,
        "engine_seconds_runs": per_round(runs["engine"]),
        "single_seconds_runs": per_round(runs["single"]),
        "naive_seconds_runs": per_round(runs["naive"]),
        "speedup_vs_naive": (len(queries) / engine_s) / naive_qps,
        "overhead_measured": engine_s / single_s - 1,
        "batch_size": engine.batch_size,
        "ttft_batch_s": ttft_b,
        "tpot_batch_s": tpot_b,
        "mean_batch_answer_tokens": n_b,
        "cost_model_unsimplified_eq8_batch": cost_model(ttft_b, tpot_b, len(experts), n_b),
        "prefix_cache": {"hits": caches["engine"].hits, "misses": caches["engine"].misses},
    }
    print(f"{label}: {row}")
    return row


def batch1(ensemble_dir: Path, queries, budgets, sample: list[int], label: str, repeats: int) -> dict:
    """Per-query latency of the engine and of the single model, one query at a time, and the cost
    model's prediction from TTFT and TPOT measured at batch 1 (the paper's regime)."""
    from seecl.see.ensemble import SeeEnsemble
    from seecl.serving.prefix_cache import PrefixCache

    ens = SeeEnsemble.open(ensemble_dir, ["generate.batch_size=1"])
    engine = ens.engine()
    engine.ask([queries[sample[0]]], 2)  # warm-up
    caches = {
        "engine": PrefixCache(engine.prefix_cache.max_tokens, engine.prefix_cache.block),
        "single": PrefixCache(engine.prefix_cache.max_tokens, engine.prefix_cache.block),
    }
    answers: dict = {}
    singles = [[i] for i in sample]
    measures = routed_and_single(ens, engine, queries, budgets, singles, caches, answers)
    measures["ttft_tpot"] = lambda item: ttft_tpot(
        engine, ens.experts()[-1], [ens.formatter().prompt_ids(queries[sample[item]])]
    )
    runs = interleaved(len(sample), measures, repeats, lambda: [cache.clear() for cache in caches.values()])
    engine_s, single_s = fastest(runs["engine"]), fastest(runs["single"])
    lengths = answer_tokens(ens, [answers[i] for i in sample])
    ttft = statistics.mean(min(t for t, _ in rounds) for rounds in runs["ttft_tpot"])
    tpot = statistics.mean(min(s for _, s in rounds) for rounds in runs["ttft_tpot"])
    n = statistics.mean(lengths)
    row = {
        "queries": len(sample),
        "engine_s_per_query": engine_s / len(sample),
        "single_s_per_query": single_s / len(sample),
        "overhead_measured": engine_s / single_s - 1,
        "rounds": repeats,
        "engine_seconds_runs": per_round(runs["engine"]),
        "single_seconds_runs": per_round(runs["single"]),
        "ttft_s": ttft,
        "tpot_s": tpot,
        "mean_answer_tokens": n,
        "cost_model_unsimplified_eq8": cost_model(ttft, tpot, len(ens.experts()), n),
        "prefix_cache": {"hits": caches["engine"].hits, "misses": caches["engine"].misses},
    }
    print(f"{label} batch 1: {row}")
    return row


def ar_by_seed(alora_label: str) -> dict:
    """AR of the aLoRA method and of its LoRA counterpart in every SuperNI run that holds both
    (results/superni-mini and its results/superni-mini-seed* repetitions), with their mean gap."""
    lora_label = alora_label.replace("-aLoRA", "")
    runs = {}
    for run in [RUN, *sorted(RUN.parent.glob(RUN.name + "-seed*"))]:
        summary = run / "summary.json"
        methods = json.loads(summary.read_text())["methods"] if summary.exists() else {}
        if lora_label in methods and alora_label in methods:
            runs[run.name] = {lora_label: methods[lora_label]["AR"], alora_label: methods[alora_label]["AR"]}
    if not runs:
        return {}
    gaps = [ar[lora_label] - ar[alora_label] for ar in runs.values()]
    return {
        "lora": lora_label,
        "alora": alora_label,
        "runs": runs,
        "gap_per_run": gaps,
        "mean_gap": statistics.mean(gaps),
    }


def targets(summary: dict, quality: dict) -> dict:
    """The issue's targets that this run can judge: metric -> value, bound and whether it is met."""
    bounds = [
        ("speedup_vs_naive", ">=", 3.0),
        ("overhead_measured", "<=", summary.get("cost_model_unsimplified_eq8_batch")),
        ("overhead_batch1", "<=", summary.get("cost_model_unsimplified_eq8")),
        ("overhead_alora", "<=", 0.1),
        ("mb_per_expert", "<=", 2.5),
        ("rss_added_100_experts_mb", "<=", 300.0),
        ("alora_latency_16_over_1", "<=", 1.3),
        ("alora_latency_64_over_1", "<=", 2.0),
    ]
    if quality:
        summary = {**summary, "alora_ar_gap_mean": quality["mean_gap"]}
        bounds.append(("alora_ar_gap_mean", "<=", 1.0))
    return {
        key: {
            "value": summary[key],
            "bound": f"{op} {bound:.3f}",
            "met": summary[key] >= bound if op == ">=" else summary[key] <= bound,
        }
        for key, op, bound in bounds
        if key in summary and bound is not None
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="SEE(10%)", help="SEE method of the SuperNI run whose LoRA experts route")
    parser.add_argument("--alora-label", default="SEE(10%)-aLoRA", help="the same for the aLoRA rows ('' skips them)")
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--naive-queries", type=int, default=50, help="queries timed for the naive process")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over the batches (each side's fastest round per batch counts)"
    )
    parser.add_argument(
        "--curve-queries", type=int, default=16, help="queries per point of the latency curve (one batch of 16)"
    )
    parser.add_argument("--out", default=str(RESULTS / "routing.json"))
    parser.add_argument(
        "--redo",
        nargs="*",
        metavar="PART",
        default=None,
        choices=PARTS,
        help=f"measure these parts again (all parts when none is named): {', '.join(PARTS)}",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from seecl.config import ModelConfig
    from seecl.data.prompts import PromptFormatter
    from seecl.model.base import load_base

    base = load_base(ModelConfig())
    queries, budgets, owners = workload(PromptFormatter(base.tokenizer, base.indicators, ""), args.n_per_task)
    del base
    out = Path(args.out)
    workload_key = {"tasks": TASKS, "n_per_task": args.n_per_task, "split": "dev", "naive_queries": args.naive_queries}
    result: dict = json.loads(out.read_text()) if out.exists() and args.redo != [] else {}
    if result.get("workload") != workload_key:
        result = {}
    for redo in args.redo or ():
        result.pop(redo, None)
    result.update({"machine": machine(), "workload": workload_key})

    def part(key: str, measure) -> None:
        # Each part compares against a baseline measured inside the same part, so a part finished
        # in an earlier (interrupted) run is kept and the others are measured now.
        if key in result:
            print(f"{key}: kept from {out.name} (--redo to measure again)")
            return
        result[key] = {**measure(), "cpu": cpu_model()}  # kept parts may come from another host
        write_json(out, result)

    sample = naive_sample(len(queries), args.naive_queries)
    for label, method in (("lora", args.label), ("alora", args.alora_label)):
        if not method or all(key in result for key in (label, f"{label}_batch1")):
            continue
        directory = ensure_ensemble(method, args.n_per_task)
        part(
            label,
            lambda: {"method": method, **compare(directory, queries, budgets, owners, label, sample, args.repeats)},
        )
        part(
            f"{label}_batch1",
            lambda: {"method": method, **batch1(directory, queries, budgets, sample, label, args.repeats)},
        )
    part("memory", memory_in_fresh_process)
    step = max(1, len(queries) // args.curve_queries)
    part("latency_vs_experts", lambda: latency_curve(queries[::step][: args.curve_queries]))
    curve = result["latency_vs_experts"]
    if "alora_last_token" not in curve:  # a curve measured before this kind existed keeps its points
        curve.update(latency_curve(queries[::step][: args.curve_queries], only={"alora_last_token"}))
        write_json(out, result)
    plot(result["latency_vs_experts"], RESULTS / "routing_latency.png")
    summary = {}
    if "lora" in result:
        summary.update(
            {
                k: result["lora"][k]
                for k in ("speedup_vs_naive", "overhead_measured", "cost_model_unsimplified_eq8_batch")
                if k in result["lora"]
            }
        )
    if "lora_batch1" in result:
        summary["overhead_batch1"] = result["lora_batch1"]["overhead_measured"]
        if "cost_model_unsimplified_eq8" in result["lora_batch1"]:
            summary["cost_model_unsimplified_eq8"] = result["lora_batch1"]["cost_model_unsimplified_eq8"]
    if "alora" in result:
        summary["overhead_alora"] = result["alora"]["overhead_measured"]
        summary["speedup_vs_naive_alora"] = result["alora"]["speedup_vs_naive"]
    if "alora_batch1" in result:
        summary["overhead_batch1_alora"] = result["alora_batch1"]["overhead_measured"]
    summary.update({k: result["memory"][k] for k in ("mb_per_expert", "rss_added_100_experts_mb")})
    for kind in ("alora", "alora_last_token"):
        points = {int(k): v for k, v in result["latency_vs_experts"].get(kind, {}).items()}
        for count in (16, 64):
            if count in points and 1 in points:
                summary[f"{kind}_latency_{count}_over_1"] = points[count] / points[1]
    result.update(summary)
    rows = [[k, f"{v:.3f}" if isinstance(v, float) else v] for k, v in summary.items()]
    print_table("Routing cost (SmolLM2-135M, CPU)", ["metric", "value"], rows)
    quality = ar_by_seed(args.alora_label) if args.alora_label else {}
    if quality:
        result["alora_ar"] = quality
        print_table(
            f"AR, {quality['lora']} against {quality['alora']}",
            ["run", quality["lora"], quality["alora"], "gap"],
            [
                [name, f"{ar[quality['lora']]:.2f}", f"{ar[quality['alora']]:.2f}", f"{gap:.2f}"]
                for (name, ar), gap in zip(quality["runs"].items(), quality["gap_per_run"])
            ],
        )
    result["targets"] = targets(summary, quality)
    print_table(
        "Targets",
        ["metric", "value", "bound", "met"],
        [[key, f"{t['value']:.3f}", t["bound"], "yes" if t["met"] else "no"] for key, t in result["targets"].items()],
    )
    write_json(out, result)


if __name__ == "__main__":
    main()
