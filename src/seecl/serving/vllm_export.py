"""The ensemble's base model as a plain Hugging Face directory that vLLM loads (`export_base`).

vLLM applies only the experts' LoRA A/B matrices: whatever else the ensemble changes in its base
(the added indicator tokens and their rows, anything later versions store in the ensemble
directory) must already be in the model vLLM loads. So the base is written once per ensemble,
built by `SeeEnsemble.base` itself (the one code path that loads an ensemble's base for training
and for the PEFT engines), and checked against the ensemble before every use (`ensure_base`).

Owns the export (atomic through `publish_dir`: the target appears complete or not at all), its
stamp (`seecl-export.json`: what it was built from) and the check that a directory is the export
of a given ensemble. Does not own base loading (model/base.py, see/ensemble.py) or serving.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from seecl.errors import SeeclError
from seecl.publish import clean_stale, publish_dir
from seecl.see.store import MANIFEST, EnsembleStore

STAMP = "seecl-export.json"
STAMP_FORMAT = "seecl-vllm-base/1"
DEFAULT_BASE_DIR = "vllm-base"  # inside the ensemble directory
# Entries of an ensemble directory that never change its base (everything else is fingerprinted:
# a file the ensemble adds to describe its base makes older exports stale without code changes here).
NOT_BASE = {MANIFEST, "experts", "tokenizer", "calibration.json", ".lock", ".work", DEFAULT_BASE_DIR, "vllm-experts"}


def default_base_dir(ensemble_dir: str | Path) -> Path:
    return EnsembleStore(ensemble_dir).root / DEFAULT_BASE_DIR


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_source(ensemble_dir: str | Path) -> dict[str, Any]:
    """What the ensemble's base is built from: the base model, the indicators, the vocabulary, the
    shared indicator rows (model.indicator_rows=shared) and the contents of the ensemble directory's
    own files."""
    store = EnsembleStore(ensemble_dir)
    manifest = store.manifest()
    files = {
        p.name: sha256_file(p)
        for p in sorted(store.root.iterdir())
        if p.is_file() and p.name not in NOT_BASE and not p.name.startswith(".")
    }
    return {
        "model": {k: manifest["model"].get(k) for k in ("name", "indicator", "indicator_rows", "system_prompt")},
        "indicators": manifest["indicators"],
        "vocab_size": manifest["vocab_size"],
        "shared_rows": manifest.get("indicator_rows"),  # shared indicator rows: their file and digest
        "files": files,
    }


def export_base(ensemble_dir: str | Path, out_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    """Write the ensemble's base (as `SeeEnsemble` loads it, on the CPU) and tokenizer to `out_dir`.

    float32 (the default) keeps the base bit-exact; bfloat16 halves it for large models. The
    directory appears complete or not at all (`publish_dir`): an interrupted export leaves only a
    hidden staging directory, removed by the next export. `out_dir` must not exist yet.
    """
    store = EnsembleStore(ensemble_dir)
    out = Path(out_dir).expanduser() if out_dir is not None else default_base_dir(store.root)
    if out.exists() or not _publish(store, out, dtype, replace=False):
        raise SeeclError(f"{out} already exists; export the base into a new directory")
    return out


def _publish(store: EnsembleStore, out: Path, dtype: str, replace: bool) -> bool:
    from seecl.see.ensemble import SeeEnsemble

    source = base_source(store.root)
    base = SeeEnsemble.open(store.root, ["model.device=cpu", f"model.dtype={dtype}"]).base
    if base.indicators.to_dict() != source["indicators"] or len(base.tokenizer) != source["vocab_size"]:
        raise SeeclError(
            f"the base model {source['model']['name']!r} no longer builds the vocabulary of "
            f"{store.root} (indicators or vocabulary size differ)"
        )

    def write(staging: Path) -> None:
        base.model.save_pretrained(staging)  # transformers 5 writes safetensors only
        base.tokenizer.save_pretrained(staging)
        stamp = {"format": STAMP_FORMAT, "dtype": dtype, "source": source}
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")

    return publish_dir(out, write, replace=replace)


def stamp_of(base_dir: str | Path) -> dict[str, Any] | None:
    path = Path(base_dir) / STAMP
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def is_current(base_dir: str | Path, ensemble_dir: str | Path) -> bool:
    """Whether `base_dir` is an export of this ensemble's current base."""
    stamp = stamp_of(base_dir)
    return stamp is not None and stamp.get("source") == base_source(ensemble_dir)


def ensure_base(ensemble_dir: str | Path, base_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    """The exported base to serve `ensemble_dir` with.

    `base_dir` None is ENSEMBLE/vllm-base: exported on first use, and exported again (then
    swapped in) when the ensemble's base has changed since. A directory given explicitly is
    exported if missing and refused if it is a stale export; a directory without a stamp (an
    export by hand, an older seecl) is checked by its tokenizer only, when the engine starts.
    """
    store = EnsembleStore(ensemble_dir)
    default = base_dir is None
    out = default_base_dir(store.root) if default else Path(base_dir).expanduser()
    clean_stale(out)
    if not out.exists():
        return export_base(store.root, out, dtype)
    stamp = stamp_of(out)
    if stamp is None or is_current(out, store.root):
        return out
    if not default:
        raise SeeclError(
            f"{out} is an export of an earlier state of {store.root}'s base (its model, indicators or "
            f"shared rows changed since); remove it, or pick a new vllm.base_dir, to export it again"
        )
    _publish(store, out, dtype, replace=True)  # swapped in atomically: `out` is always complete
    return out


def check_base(base_dir: str | Path, tokenizer, manifest: dict[str, Any]) -> None:
    """The exported base must tokenize the indicators to the ids the experts were trained with."""
    ind = manifest["indicators"]
    for text, ids in ((ind["pos"], ind["pos_ids"]), (ind["neg"], ind["neg_ids"])):
        if tokenizer.encode(text, add_special_tokens=False) != list(ids):
            raise SeeclError(f"{base_dir}: tokenizer does not map {text!r} to {ids}; run export_base for this ensemble")
    config = Path(base_dir) / "config.json"
    if not config.is_file():
        raise SeeclError(f"{base_dir}: not a model directory (no config.json); run export_base for this ensemble")
    vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    if vocab is not None and vocab < manifest["vocab_size"]:
        raise SeeclError(
            f"{base_dir}: vocabulary of {vocab} rows, the ensemble needs "
            f"{manifest['vocab_size']}; run export_base for this ensemble"
        )
