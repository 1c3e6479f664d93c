"""Experts with their own indicator rows, rewritten as plain LoRA adapters that vLLM serves.

A default expert carries its own `<<pos>>`/`<<neg>>` embedding rows (PEFT trainable tokens), which
vLLM does not apply. The same change is a LoRA on the embedding and on the output head: with
`A` one-hot at the indicator ids and `B` the rows' difference from the exported base's rows, the
embedding returns the expert's rows for the indicator ids and the base's for every other token,
and the head scores the indicators with the expert's rows (a tied head shares the embedding's
rows, as PEFT ties them). The rewrite is exact up to float rounding, needs rank 2 of the adapter's
rank, and leaves the expert's other LoRA matrices untouched: the routes and answers are the
PEFT engine's, from the very experts `seecl learn` trains by default.

Owns the rewrite (`lora_rows_adapter`) and its copies in ENSEMBLE/vllm-experts/<name>/, each
written atomically and stamped with the files it was made from (`ensure_expert`). Does not own
the base export (vllm_export.py), which experts vLLM serves at all (vllm_llm.py) or routing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from seecl.adapters import read_adapter_config
from seecl.errors import SeeclError
from seecl.publish import clean_stale, publish_dir
from seecl.see.shared_rows import PEFT_PREFIX, read_rows
from seecl.see.store import EnsembleStore
from seecl.serving.vllm_export import STAMP as EXPORT_STAMP
from seecl.serving.vllm_export import sha256_file

EXPERTS_DIR = "vllm-experts"  # inside the ensemble directory
STAMP = "seecl-vllm-expert.json"
STAMP_FORMAT = "seecl-vllm-expert/1"
OUTPUT_HEAD = "lm_head"


def has_token_rows(directory: str | Path) -> bool:
    return bool(read_adapter_config(Path(directory)).get("trainable_token_indices"))


def _base_tensors(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of an exported base (one file or a sharded index)."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: base_dir / file for name, file in weight_map.items()}
    single = base_dir / "model.safetensors"
    if not single.is_file():
        raise SeeclError(f"{base_dir}: no model.safetensors in the exported base")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def base_rows(files: dict[str, Path], module: str, token_ids: list[int]) -> torch.Tensor:
    """Rows `token_ids` of weight `module` in an exported base (`_base_tensors`), read without
    loading the model."""
    name = f"{module}.weight"
    if name not in files:
        raise SeeclError(f"the exported base has no tensor {name!r}")
    with safe_open(str(files[name]), framework="pt") as handle:
        rows = handle.get_slice(name)
        return torch.stack([rows[i : i + 1][0] for i in token_ids])


def _base_config(base_dir: Path) -> dict:
    """The exported base's config.json, over its text model's settings (for multimodal ones)."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    return {**(config.get("text_config") or {}), **{k: v for k, v in config.items() if v is not None}}


def lora_rows_adapter(expert_dir: str | Path, out_dir: str | Path, base_dir: str | Path) -> None:
    """Write to `out_dir` the expert of `expert_dir` with its indicator rows as embedding and
    output-head LoRA matrices over the exported base `base_dir`."""
    expert_dir, out_dir, base_dir = Path(expert_dir), Path(out_dir), Path(base_dir)
    token_ids, rows, plain, config = read_rows(expert_dir)
    r = int(config["r"])
    if len(token_ids) > r:
        raise SeeclError(f"{expert_dir}: {len(token_ids)} indicator rows need LoRA rank >= {len(token_ids)}, not {r}")
    scaling = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
    tensors = dict(plain)
    if isinstance(config.get("target_modules"), str):
        raise SeeclError(f"{expert_dir}: target_modules is a pattern; vLLM needs module names")
    targets = list(config.get("target_modules") or [])
    heads = {module: (values, module) for module, values in rows.items()}  # rows, base weight they replace
    embedding = next((m for m in rows if m.endswith("embed_tokens")), None)
    base_config = _base_config(base_dir)
    if embedding is not None and OUTPUT_HEAD not in rows and base_config.get("tie_word_embeddings", False):
        heads[OUTPUT_HEAD] = (rows[embedding], embedding)  # PEFT ties the head's rows to the embedding's
    vocab = int(base_config["vocab_size"])
    files = _base_tensors(base_dir)
    for module, (values, weight) in heads.items():
        delta = (values.to(torch.float32) - base_rows(files, weight, token_ids).to(torch.float32)) / scaling
        one_hot = torch.zeros(len(token_ids), vocab)
        one_hot[range(len(token_ids)), token_ids] = 1.0
        pad = (0, 0, 0, r - len(token_ids))  # rank r, the rows in the first len(token_ids) ranks
        if module == OUTPUT_HEAD:  # logits += (h A^T) B^T * scaling
            lora = {"lora_A.weight": F.pad(delta, pad), "lora_B.weight": F.pad(one_hot, pad).T}
        else:  # embedding += A^T[token] B^T * scaling
            lora = {"lora_embedding_A": F.pad(one_hot, pad), "lora_embedding_B": F.pad(delta, pad).T}
        for suffix, tensor in lora.items():
            tensors[f"{PEFT_PREFIX}{module}.{suffix}"] = tensor.to(values.dtype)
        short = module.rsplit(".", 1)[-1]
        if short not in targets:
            targets.append(short)
    config["target_modules"] = targets
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _source(expert_dir: Path, base_dir: Path) -> dict:
    return {
        "adapter": sha256_file(expert_dir / "adapter_model.safetensors"),
        "config": sha256_file(expert_dir / "adapter_config.json"),
        "base": {n: sha256_file(base_dir / n) for n in ("config.json", EXPORT_STAMP) if (base_dir / n).is_file()},
    }


def ensure_expert(ensemble_dir: str | Path, name: str, base_dir: str | Path) -> Path:
    """The vLLM form of expert `name`: its own directory when it is plain LoRA, else its rewrite
    in ENSEMBLE/vllm-experts/<name>/, written (atomically) when missing or made from other files."""
    store = EnsembleStore(ensemble_dir)
    expert_dir, base_dir = store.expert_dir(name), Path(base_dir)
    if not has_token_rows(expert_dir):
        return expert_dir
    out = store.root / EXPERTS_DIR / name
    clean_stale(out)
    source = _source(expert_dir, base_dir)
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("source") == source:
        return out

    def write(staging: Path) -> None:
        lora_rows_adapter(expert_dir, staging, base_dir)
        (staging / STAMP).write_text(json.dumps({"format": STAMP_FORMAT, "source": source}, indent=2) + "\n")

    publish_dir(out, write, replace=True)
    return out
