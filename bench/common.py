"""Helpers shared by the benchmark scripts: paths, tables, JSON results, a GEMM ceiling, and timing
on a shared, noisy machine (interleaved rounds, fastest round per item)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("SEECL_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "results" / "bench"


def cpu_model() -> str:
    """The processor's name (timings taken on different processors do not compare)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
    }


# Environment settings that change what a benchmark measures (threads, vLLM's process layout, data).
MEASURED_ENV = ("OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING", "SEECL_DATA")


def command_line() -> str:
    """The command that is running, as typed from the repository root, with the MEASURED_ENV
    settings it ran under: what reruns a result."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    env = [f"{name}={os.environ[name]}" for name in MEASURED_ENV if name in os.environ]
    return shlex.join([*env, "python", str(shown), *sys.argv[1:]])


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically, with the command line that produced it as its "command"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, "command": command_line()}, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    """Print a markdown table and return it."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def gemm_ceiling(shapes: list[tuple[int, int, int]], seconds: float = 2.0) -> float:
    """Best fp32 GFLOP/s of torch.mm over the given (m, k, n) shapes on this machine, now."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            torch.mm(a, b)
            count += 1
        elapsed = time.perf_counter() - started
        best = max(best, 2 * m * k * n * count / elapsed / 1e9)
    return best


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def interleaved(items: int, measures: dict, repeats: int, new_round=lambda: None) -> dict[str, list[list]]:
    """Every measure (name -> function of an item index) on item 0, then every measure on item 1,
    and so on, for `repeats` rounds (`new_round` runs before each). A slow spell of the shared
    machine then falls on all sides of the items it spans, not on one side's whole run; each
    side's fastest round per item is what counts. Returns name -> [item][round] results."""
    results = {name: [[] for _ in range(items)] for name in measures}
    for round_ in range(repeats):
        new_round()
        for item in range(items):
            for name, measure in measures.items():
                results[name][item].append(measure(item))
        totals = {
            name: per_round(per_item)[-1] for name, per_item in results.items() if isinstance(per_item[0][-1], float)
        }
        print(
            f"round {round_ + 1}/{repeats}: " + ", ".join(f"{name} {t:.1f} s" for name, t in totals.items()), flush=True
        )
    return results


def fastest(per_item: list[list[float]]) -> float:
    """Sum over the items of each item's fastest round."""
    return sum(min(rounds) for rounds in per_item)


def per_round(per_item: list[list[float]]) -> list[float]:
    """Total of each round (every round's items added up), as recorded for inspection."""
    return [sum(rounds[r] for rounds in per_item) for r in range(len(per_item[0]))]
