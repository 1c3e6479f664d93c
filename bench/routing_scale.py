"""Routing cost as the ensemble grows: memory per attached expert and routing latency per query
against the number of experts asked (1..64), for LoRA and aLoRA experts.

The experts are randomly initialised: their latency and memory do not depend on what they learned,
so no training is needed. Parts of bench/routing.py (which owns the JSON, its resumption and the
targets); this module only measures and plots.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from common import ROOT, timed


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def random_experts(base, count: int, adapter):
    """The base with `count` freshly initialised (random B) experts of settings `adapter` attached."""
    import torch

    from seecl.adapters import add_expert, invocation_tokens
    from seecl.data.prompts import PromptFormatter

    formatter = PromptFormatter(base.tokenizer, base.indicators)
    invocation = invocation_tokens(adapter, formatter.invocation_ids())
    model = base.model
    for i in range(count):
        model = add_expert(model, f"e{i}", adapter, base.indicators, seed=i, invocation_tokens=invocation)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f"lora_B.e{i}." in name:
                    param.normal_(0, 0.01)
    model.eval()
    return model, formatter


def memory_curve() -> dict:
    from seecl.config import ModelConfig
    from seecl.model.base import load_base

    gc.collect()
    base = load_base(ModelConfig())
    rss = {0: rss_mb()}
    model, attached = base.model, 0
    from seecl.adapters import add_expert
    from seecl.config import AdapterConfig

    for target in (1, 10, 100):
        while attached < target:
            model = add_expert(model, f"m{attached}", AdapterConfig(), base.indicators, seed=attached)
            attached += 1
        gc.collect()
        rss[target] = rss_mb()
    added = rss[100] - rss[0]
    return {"rss_mb": rss, "rss_added_100_experts_mb": added, "mb_per_expert": added / 100}


def memory_in_fresh_process() -> dict:
    """`memory_curve` in a new interpreter: memory freed by earlier parts would hide growth."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(memory_curve)


def latency_curve(queries: list[str], counts=(1, 2, 4, 8, 16, 32, 64), only: set[str] | None = None) -> dict:
    """Routing-only latency per query when every expert is asked.

    Random experts rarely put an indicator first, and a check without one sends the query to the
    base model at once; here every verdict is turned into `neg`, which changes no computation but
    keeps each query walking through all `count` experts (checked on the returned routes).
    """
    from unittest import mock

    import seecl.serving.engine
    from seecl.config import AdapterConfig, ModelConfig
    from seecl.model.base import load_base
    from seecl.serving.engine import RoutingEngine
    from seecl.serving.routing import decide

    def always_negative(logprobs, indicators, threshold=None):
        _, p_pos, p_neg = decide(logprobs, indicators, threshold)
        return "neg", p_pos, p_neg

    curve = {}
    # "alora_last_token": aLoRA experts invoked by the header's last token only (the rest of the
    # header is read once, in the shared body), the shortest check segment an expert can have.
    kinds = {
        "lora": AdapterConfig(kind="lora"),
        "alora": AdapterConfig(kind="alora"),
        "alora_last_token": AdapterConfig(kind="alora", alora_invocation="last_token"),
    }
    for key, adapter in kinds.items():
        if only is not None and key not in only:
            continue
        base = load_base(ModelConfig())
        model, formatter = random_experts(base, max(counts), adapter)
        curve[key] = {}
        for count in counts:
            engine = RoutingEngine(
                model, formatter, [f"e{i}" for i in range(count)], batch_size=16, prefix_cache_tokens=0
            )
            with mock.patch.object(seecl.serving.engine, "decide", always_negative):
                engine.route(queries[:2])
                routes, seconds = timed(lambda: engine.route(queries))
            asked = {len(route.checks) for route in routes}
            if asked != {count}:
                raise RuntimeError(f"{key} x{count}: queries were checked by {sorted(asked)} experts")
            curve[key][count] = seconds / len(queries)
            print(f"latency {key} x{count}: {1000 * curve[key][count]:.1f} ms/query")
        del model, base
        gc.collect()
    return curve


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, points in ((k, curve[k]) for k in ("lora", "alora", "alora_last_token") if k in curve):
        xs = sorted(int(k) for k in points)
        ax.plot(
            xs,
            [1000 * points[k] if k in points else 1000 * points[str(k)] for k in xs],
            marker="o",
            label={
                "lora": "LoRA experts",
                "alora": "aLoRA experts (4-token invocation)",
                "alora_last_token": "aLoRA experts (1-token invocation)",
            }[kind],
        )
    ax.set_xlabel("experts asked per query")
    ax.set_ylabel("routing time per query (ms)")
    ax.set_title("Routing latency (fast engine, batch 16)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path.relative_to(ROOT)}")
