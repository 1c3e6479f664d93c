"""One benchmark, several task orders: each method's AR and BWT per order and their mean (the SEE
paper's Table 1 averages orders 1-3).

Owns reading the `summary.json` of finished `seecl bench superni` runs, checking that they are the
same benchmark in different orders (same tasks, sizes, split and data; a method counts toward the
mean only with the same settings in every run), the mean, and its markdown table. Does not run or
score anything (recipes/superni.py) and does not render a single run (report.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from seecl.errors import SeeclError
from seecl.evaluation.report import fmt
from seecl.publish import read_json_object

# What must be equal for two runs to be the same benchmark in another order.
SAME_IN_EVERY_ORDER = ("data_dir", "eval_split", "n_train", "n_eval", "ood_file", "n_ood")


def load_run(run: str | Path) -> dict:
    """A finished run's summary.json, with its directory."""
    path = Path(run) / "summary.json"
    if not path.exists():
        raise SeeclError(f"{path}: not found; `seecl bench superni --out {run}` writes it")
    summary = read_json_object(path, "not a benchmark summary", SeeclError)
    if not isinstance(summary.get("config"), dict):
        raise SeeclError(f"{path}: not a benchmark summary (no config)")
    if not isinstance(summary.get("methods"), dict):
        raise SeeclError(f"{path}: not a benchmark summary (no methods)")
    return {"dir": str(run), **summary}


def check_same_benchmark(runs: Sequence[dict]) -> None:
    """Refuse runs that are not one benchmark in different orders."""
    if len(runs) < 2:
        raise SeeclError("give at least two runs (one per task order)")
    first = runs[0]
    seen: dict[tuple, str] = {}
    for run in runs:
        config = run["config"]
        order = tuple(config.get("order") or ())
        if sorted(order) != sorted(first["config"].get("order") or ()):
            raise SeeclError(
                f"{run['dir']} learns {', '.join(order)}; {first['dir']} learns "
                f"{', '.join(first['config'].get('order') or ())}: not the same tasks"
            )
        for key in SAME_IN_EVERY_ORDER:
            if config.get(key) != first["config"].get(key):
                raise SeeclError(
                    f"{run['dir']} has {key}={config.get(key)!r} and {first['dir']} {key}="
                    f"{first['config'].get(key)!r}: not the same benchmark"
                )
        if order in seen:
            raise SeeclError(f"{run['dir']} and {seen[order]} learn the same order; give each order once")
        seen[order] = run["dir"]


def across_orders(runs: Sequence[dict]) -> dict:
    """Per method (in the first run's order of methods, then new ones): AR and BWT in each run (None
    where the run lacks it) and their means where every run holds the method with the same settings."""
    check_same_benchmark(runs)
    labels = list(dict.fromkeys(label for run in runs for label in run["methods"]))
    methods = {}
    for label in labels:
        rows = [run["methods"].get(label) for run in runs]
        present = [row for row in rows if row is not None]
        if len(present) < len(rows):
            why = "not in every run"
        elif len({row.get("settings") for row in present}) > 1:
            why = "settings differ between runs"
        else:
            why = None
        entry: dict = {"complete": why is None, "why_not": why}
        for metric in ("AR", "BWT"):
            values = [row.get(metric) if row else None for row in rows]
            entry[metric] = values
            usable = why is None and all(v is not None for v in values)
            entry[f"{metric}_mean"] = statistics.mean(values) if usable else None
        methods[label] = entry
    return {"runs": [{"dir": run["dir"], "order": run["config"]["order"]} for run in runs], "methods": methods}


def orders_markdown(result: dict) -> str:
    """The table: AR in each run and its mean, then BWT; below it each run's order, and why a method
    has no mean."""
    names = [f"({i})" for i in range(1, len(result["runs"]) + 1)]
    header = ["method", *[f"AR {n}" for n in names], "AR mean", *[f"BWT {n}" for n in names], "BWT mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m in result["methods"].items():
        row = [label, *map(fmt, m["AR"]), fmt(m["AR_mean"]), *map(fmt, m["BWT"]), fmt(m["BWT_mean"])]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {n}: {' → '.join(run['order'])} ({run['dir']})" for n, run in zip(names, result["runs"])]
    for why in dict.fromkeys(m["why_not"] for m in result["methods"].values() if m["why_not"]):
        labels = [label for label, m in result["methods"].items() if m["why_not"] == why]
        lines.append(f"- No mean, {why}: {', '.join(labels)}.")
    return "\n".join(lines) + "\n"
