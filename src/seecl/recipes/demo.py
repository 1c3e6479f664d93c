"""`seecl demo`: SEE learns five synthetic tasks one after another, then routes their eval queries.

A recipe that reads top to bottom: build the tasks, learn one expert per task (skipping experts a
previous run already published, so an interrupted demo resumes), answer every eval query plus a
few general questions through sequential routing, score routing and ROUGE-L, and write
config.yaml, results.json, answers.jsonl and table.md into the output directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from seecl.config import RunConfig, load_config, save_config
from seecl.data.synthetic import SYNTHETIC_TASKS, general_task, make_task
from seecl.errors import SeeclError
from seecl.evaluation.metrics import BASE, mean, rouge_l, routing_accuracy
from seecl.publish import make_dir
from seecl.see.ensemble import SeeEnsemble

DEMO_TASKS = ("reverse_list", "uppercase", "sentiment", "km_to_m", "add")
# Synthetic prompts are short; the template's default system message would add ~20 tokens to each.
DEMO_OVERRIDES = ["model.system_prompt="]


def demo_config(overrides: list[str]) -> RunConfig:
    return load_config(overrides=DEMO_OVERRIDES + list(overrides))


def run_demo(
    out: str | Path = "seecl-demo",
    tasks: tuple[str, ...] = DEMO_TASKS,
    n_train: int = 48,
    n_eval: int = 16,
    overrides: list[str] | None = None,
    console=None,
) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)  # progress; the results table goes to stdout
    out = Path(out)
    cfg = demo_config(overrides or [])
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown:
        raise SeeclError(f"unknown demo task(s) {unknown}; known: {sorted(SYNTHETIC_TASKS)}")
    started = time.perf_counter()
    make_dir(out, SeeclError)
    save_config(cfg, out / "config.yaml")
    ensemble = SeeEnsemble(out / "ensemble", cfg)
    console.print(f"[bold]seecl demo[/bold]: {len(tasks)} tasks on {cfg.model.name}, outputs in {out}/")

    # 1. Learn the tasks in order, one fresh expert each.
    for number, name in enumerate(tasks, start=1):
        task = make_task(name, "train", n_train, seed=cfg.see.seed)
        if name in ensemble.experts():
            if ensemble.store.expert_meta(name)["data_fingerprint"] != task.fingerprint():
                raise SeeclError(
                    f"{out}/ensemble holds an expert {name!r} trained on other data; use a fresh --out directory"
                )
            console.print(f"stage {number}/{len(tasks)}: expert {name!r} already trained, skipping")
            continue
        console.print(f"stage {number}/{len(tasks)}: learning {name!r} ({len(task)} instances)")
        record = ensemble.learn(task)
        negatives = sum(record["n_negatives"].values())
        console.print(
            f"  {negatives} negatives from earlier tasks, final loss "
            f"{record['metrics']['final_loss']:.3f}, {record['metrics']['seconds']:.0f} s"
        )

    # 2. Route every eval query (and general questions no expert should claim).
    formatter = ensemble.formatter()
    evals = {name: make_task(name, "eval", n_eval, seed=cfg.see.seed) for name in tasks}
    ood = general_task()
    queries, owners, refs, budgets = [], [], [], []
    for name, task in evals.items():
        budget = formatter.answer_budget([r for i in task.instances for r in i.references])
        for inst in task.instances:
            queries.append(inst.query)
            owners.append(name)
            refs.append(inst.references)
            budgets.append(budget)
    for inst in ood.instances:
        queries.append(inst.query)
        owners.append(BASE)
        refs.append(inst.references)
        budgets.append(cfg.generate.max_new_tokens)
    console.print(f"routing {len(queries)} queries through {len(tasks)} experts ...")
    answers = ensemble.ask(queries, budgets)

    # 3. Score and report.
    rows = []
    for name in tasks:
        idx = [i for i, o in enumerate(owners) if o == name]
        rows.append(
            {
                "task": name,
                "queries": len(idx),
                "routing_accuracy": routing_accuracy([name] * len(idx), [answers[i].route.answered_by for i in idx]),
                "rouge_l": mean([rouge_l(answers[i].text, refs[i]) for i in idx]),
            }
        )
    ood_idx = [i for i, o in enumerate(owners) if o == BASE]
    to_base = sum(answers[i].route.answered_by == BASE for i in ood_idx)
    task_idx = [i for i, o in enumerate(owners) if o != BASE]
    overall = routing_accuracy([owners[i] for i in task_idx], [answers[i].route.answered_by for i in task_idx])
    results = {
        "model": cfg.model.name,
        "tasks": list(tasks),
        "n_train": n_train,
        "n_eval": n_eval,
        "per_task": rows,
        "routing_accuracy": overall,
        "rouge_l": mean([r["rouge_l"] for r in rows]),
        "ood_queries": len(ood_idx),
        "ood_to_base": to_base,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "answers.jsonl", "w", encoding="utf-8") as handle:
        for answer, owner in zip(answers, owners):
            handle.write(json.dumps({"task": owner, **answer.to_dict()}, ensure_ascii=False) + "\n")

    table = Table(title=f"SEE on {len(tasks)} synthetic tasks ({cfg.model.name})")
    for column in ("task", "queries", "routing acc.", "ROUGE-L"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(row["task"], str(row["queries"]), f"{row['routing_accuracy']:.1%}", f"{row['rouge_l']:.1f}")
    table.add_row(
        "[bold]all tasks[/bold]", str(len(task_idx)), f"[bold]{overall:.1%}[/bold]", f"{results['rouge_l']:.1f}"
    )
    (out / "table.md").write_text(markdown_table(results))
    Console().print(table)
    print(f"OOD: {to_base}/{len(ood_idx)} general questions answered by the base model")
    print(f"outputs: {out}/ (results.json, answers.jsonl, table.md, ensemble/); {results['seconds']:.0f} s")
    return results


def markdown_table(results: dict) -> str:
    lines = ["| task | queries | routing acc. | ROUGE-L |", "|---|---:|---:|---:|"]
    for row in results["per_task"]:
        lines.append(f"| {row['task']} | {row['queries']} | {row['routing_accuracy']:.1%} | {row['rouge_l']:.1f} |")
    n = sum(r["queries"] for r in results["per_task"])
    lines.append(f"| **all tasks** | {n} | **{results['routing_accuracy']:.1%}** | {results['rouge_l']:.1f} |")
    lines.append("")
    lines.append(
        f"OOD: {results['ood_to_base']}/{results['ood_queries']} general questions answered by the base model."
    )
    return "\n".join(lines) + "\n"
