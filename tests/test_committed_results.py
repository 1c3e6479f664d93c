"""Every committed benchmark row can be scored again without training: each stage of a method whose
adapters live in the adapter cache names its cache entry, and the entry is committed with the run.

Checked for the rows computed since summaries carry the data they were computed on (`benchmark`);
MoSEs and SETA keep per-stage snapshots (6-21 MB) out of git instead of cache entries."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "results"
RUNS = sorted(p.parent for p in RESULTS.glob("*/summary.json"))


def fingerprinted_rows(run):
    summary = json.loads((run / "summary.json").read_text())
    return [label for label, row in summary["methods"].items() if row.get("benchmark")]


@pytest.mark.parametrize("run", [r for r in RUNS if fingerprinted_rows(r)], ids=lambda p: p.name)
def test_every_stage_of_a_committed_row_has_its_cache_entry(run):
    from seecl.recipes.superni import method_dirname

    summary = json.loads((run / "summary.json").read_text())
    caches = [run / "cache"] + [
        RESULTS.parent / p / "cache" for p in summary["config"].get("reuse_experts", []) if not Path(p).is_absolute()
    ]
    missing = []
    for label in fingerprinted_rows(run):
        if label in ("MoSEs", "SETA"):
            continue
        state = json.loads((run / "methods" / method_dirname(label) / "protocol.json").read_text())
        for stage, metrics in sorted(state["stages"].items()):
            key = metrics.get("cache_key")
            if key is None:
                missing.append(f"{label} stage {int(stage) + 1}: no cache_key")
            elif not any((cache / key / "adapter_model.safetensors").is_file() for cache in caches):
                missing.append(f"{label} stage {int(stage) + 1}: {key} not in the cache")
    assert not missing, missing
