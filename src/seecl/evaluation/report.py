"""Benchmark summaries -> markdown tables and PNG plots (matplotlib, no display needed).

Input is the `summary.json` structure of recipes/superni.py: {"config": ..., "methods": {label:
method summary}}. Plots: per-task scores by method, the routing confusion matrix of one routed
method, and tau curves (AR and routing F1 against tau for SEE(x%) labels).
"""

from __future__ import annotations

import re
from pathlib import Path

_TAU = re.compile(r"^SEE\((?P<tau>[0-9.]+)%\)$")


def fmt(value, digits: int = 1) -> str:
    """A table cell: – for a missing value, floats to `digits` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main_table(summary: dict) -> str:
    methods = summary["methods"]
    tasks = summary["config"]["order"]
    header = [
        "method",
        "AR",
        "BWT",
        *tasks,
        "routing F1",
        "F1 with OOD claims",
        "RB-Acc",
        "trainable params (final)",
        "time (min)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, m in methods.items():  # routing F1: over task queries; with OOD: OOD claims are false positives
        params = [p for p in m.get("trainable_parameters", []) if p]
        seconds = sum(m.get("seconds", {}).values())
        row = [
            label,
            fmt(m["AR"]),
            fmt(m["BWT"]),
            *[fmt(m["per_task"].get(t)) for t in tasks],
            fmt(m["routing_f1"], 3),
            fmt(m.get("routing_f1_with_ood"), 3),
            fmt(m["rb_acc"], 3),
            f"{params[-1]:,}" if params else "–",
            f"{seconds / 60:.0f}" + (f" (+{m['reused_cells']} cells reused)" if m.get("reused_cells") else ""),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def matrix_table(label: str, method: dict, tasks: list[str]) -> str:
    lines = [
        f"**{label}** (rows: after stage, columns: task; – = not evaluated)",
        "",
        "| stage | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for i, row in enumerate(method["matrix"]):
        lines.append(f"| {i + 1} ({tasks[i]}) | " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def confusion_table(label: str, method: dict, tasks: list[str]) -> str:
    routing = method["routing"]
    columns = routing["columns"]
    lines = [
        f"**{label}** routing (rows: true task, columns: answered by)",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for task, row in zip(tasks, routing["confusion"]):
        lines.append(f"| {task} | " + " | ".join(str(v) for v in row) + " |")
    ood = routing.get("ood_confusion") or {}
    if ood:
        lines.append("| OOD | " + " | ".join(str(ood.get(c, 0)) for c in columns) + " |")
    return "\n".join(lines)


def parameters_table(summary: dict) -> str:
    tasks = summary["config"]["order"]
    lines = ["| method | " + " | ".join(f"after {t}" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, m in summary["methods"].items():
        counts = list(m.get("trainable_parameters") or [])
        counts += [None] * (len(tasks) - len(counts))
        lines.append(f"| {label} | " + " | ".join("–" if c is None else f"{c:,}" for c in counts) + " |")
    return "\n".join(lines)


def tau_points(summary: dict) -> list[tuple[float, str, dict]]:
    points = []
    for label, m in summary["methods"].items():
        match = _TAU.match(label)
        if match:
            points.append((float(match["tau"]), label, m))
    return sorted(points)


def markdown(summary: dict) -> str:
    tasks = summary["config"]["order"]
    parts = ["# SuperNI benchmark", "", summary.get("description", ""), "", "## Results", "", main_table(summary), ""]
    ems = {label: m["exact_match"] for label, m in summary["methods"].items() if m.get("exact_match")}
    if ems:
        em_tasks = sorted({t for v in ems.values() for t in v})
        parts += [
            "Exact match (classification tasks, final model):",
            "",
            "| method | " + " | ".join(em_tasks) + " |",
            "|---|" + "---|" * len(em_tasks),
        ]
        parts += [f"| {label} | " + " | ".join(fmt(v.get(t)) for t in em_tasks) + " |" for label, v in ems.items()]
        parts.append("")
    ppl = {label: m["perplexity"] for label, m in summary["methods"].items() if m.get("perplexity")}
    if ppl:
        parts += [
            "Ensemble perplexity of the reference answers (each (q, r) scored by the expert q is "
            "routed to; final model):",
            "",
            "| method | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        parts += [f"| {label} | " + " | ".join(fmt(v.get(t), 2) for t in tasks) + " |" for label, v in ppl.items()]
        parts.append("")
    points = tau_points(summary)
    if len(points) > 1:
        parts += ["## SEE: rehearsal ratio", "", "| tau | AR | BWT | routing F1 | RB-Acc |", "|---|---|---|---|---|"]
        parts += [
            f"| {tau:g}% | {fmt(m['AR'])} | {fmt(m['BWT'])} | {fmt(m['routing_f1'], 3)} | {fmt(m['rb_acc'], 3)} |"
            for tau, _, m in points
        ]
        parts.append("")
    if any(m.get("trainable_parameters") for m in summary["methods"].values()):
        parts += [
            "Trainable parameters held by the method after each stage (all experts / adapters so far):",
            "",
            parameters_table(summary),
            "",
        ]
    parts += ["## Score matrices", ""]
    for label, m in summary["methods"].items():
        parts += [matrix_table(label, m, tasks), ""]
    routed = [(label, m) for label, m in summary["methods"].items() if m.get("routing")]
    if routed:
        parts += ["## Routing", ""]
        for label, m in routed:
            parts += [confusion_table(label, m, tasks), ""]
    return "\n".join(parts).rstrip() + "\n"


def plot_per_task(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["config"]["order"]
    methods = list(summary["methods"].items())
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks) + 0.4 * len(methods)), 4.5))
    for k, (label, m) in enumerate(methods):
        xs = [i + k * width for i in range(len(tasks))]
        ax.bar(xs, [m["per_task"].get(t) or 0 for t in tasks], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("ROUGE-L (final model)")
    ax.set_title("Per-task scores by method")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(label: str, method: dict, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routing = method["routing"]
    rows = [list(r) for r in routing["confusion"]]
    row_labels = list(tasks)
    if routing.get("ood_confusion"):
        rows.append([routing["ood_confusion"].get(c, 0) for c in routing["columns"]])
        row_labels.append("OOD")
    fig, ax = plt.subplots(figsize=(1.2 * len(routing["columns"]) + 2, 0.8 * len(rows) + 1.5))
    ax.imshow(rows, cmap="Blues")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(routing["columns"])), routing["columns"])
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("answered by")
    ax.set_ylabel("query of task")
    ax.set_title(f"{label}: routing")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tau(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = tau_points(summary)
    taus = [p[0] for p in points]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(taus, [p[2]["AR"] for p in points], "o-", color="tab:blue", label="AR")
    left.set_xlabel("tau (% of each earlier task's queries)")
    left.set_ylabel("AR (ROUGE-L)", color="tab:blue")
    right = left.twinx()
    right.plot(taus, [p[2]["routing_f1"] for p in points], "s--", color="tab:orange", label="routing F1")
    right.set_ylabel("routing F1", color="tab:orange")
    left.set_xscale("log")
    left.set_xticks(taus, [f"{t:g}" for t in taus])
    left.set_title("SEE: AR and routing F1 against tau")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out: Path, confusion_for: str = "SEE(10%)") -> list[Path]:
    """report.md plus the plots that the summary has data for; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md"]
    (out / "report.md").write_text(markdown(summary))
    if summary["methods"]:
        plot_per_task(summary, out / "per_task.png")
        written.append(out / "per_task.png")
    tasks = summary["config"]["order"]
    method = summary["methods"].get(confusion_for)
    if method and method.get("routing"):
        name = "routing_confusion_" + re.sub(r"[^A-Za-z0-9]+", "_", confusion_for).strip("_") + ".png"
        plot_confusion(confusion_for, method, tasks, out / name)
        written.append(out / name)
    if len(tau_points(summary)) > 1:
        plot_tau(summary, out / "tau_curves.png")
        written.append(out / "tau_curves.png")
    return written
