"""Indicator rows shared by a whole ensemble (`model.indicator_rows=shared`), so experts are plain LoRA.

By default every expert trains its own copy of the `<<pos>>`/`<<neg>>` embedding rows (PEFT
trainable tokens), which serving systems that apply only LoRA A/B matrices (vLLM) ignore. With
shared rows the first expert trains them as usual, then they move out of its adapter into the
ensemble directory (`indicator_rows.safetensors`) and into the base every reader loads; every
later expert trains LoRA weights only, over that base. Owns taking the rows out of a saved adapter
(which leaves a plain LoRA adapter behind), writing them into a model, and their file format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seecl.adapters import check_safetensors, read_adapter_config

ROWS_FILE = "indicator_rows.safetensors"
TOKEN_ROWS_TENSOR = ".token_adapter.trainable_tokens_delta"
PEFT_PREFIX = "base_model.model."


def read_rows(adapter_dir: Path) -> tuple[list[int], dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """A saved PEFT adapter split into its trained indicator rows and the rest, without changing it.

    Returns (token ids, {module path: [len(ids), hidden] rows} e.g. {"model.embed_tokens": ...},
    the other tensors, the adapter config without `trainable_token_indices`).
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    token_ids = config.pop("trainable_token_indices", None)
    if not token_ids:
        raise ValueError(f"{adapter_dir}: the adapter trained no indicator rows")
    if isinstance(token_ids, dict):  # PEFT's per-module form; the indicator rows are the same everywhere
        token_ids = next(iter(token_ids.values()))
    check_safetensors(adapter_dir / "adapter_model.safetensors")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    rows = {
        name[len(PEFT_PREFIX) : -len(TOKEN_ROWS_TENSOR)]: tensor.clone()
        for name, tensor in tensors.items()
        if name.endswith(TOKEN_ROWS_TENSOR)
    }
    plain = {name: tensor for name, tensor in tensors.items() if not name.endswith(TOKEN_ROWS_TENSOR)}
    return list(token_ids), rows, plain, config


def take_rows(adapter_dir: Path) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Move the trained indicator rows out of a saved PEFT adapter, leaving a plain LoRA adapter.

    Returns the token ids and {module path: [len(ids), hidden] rows}, e.g. {"model.embed_tokens": ...}.
    """
    adapter_dir = Path(adapter_dir)
    token_ids, rows, plain, config = read_rows(adapter_dir)
    save_file(plain, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (adapter_dir / "adapter_config.json").write_text(text, encoding="utf-8")
    return token_ids, rows


def apply_rows(model: torch.nn.Module, token_ids: list[int], rows: dict[str, torch.Tensor]) -> None:
    """Write the rows into the model's weights in place (a tied head shares the embedding's)."""
    index = torch.tensor(token_ids, dtype=torch.long)
    with torch.no_grad():
        for path, values in rows.items():
            weight = model.get_submodule(path).weight
            weight.index_copy_(0, index.to(weight.device), values.to(weight))


def save_rows(path: Path, token_ids: list[int], rows: dict[str, torch.Tensor]) -> str:
    """Write the rows file; returns its digest (what later experts were trained over)."""
    save_file(
        {name: t.contiguous() for name, t in rows.items()}, str(path), metadata={"token_ids": json.dumps(token_ids)}
    )
    return rows_digest(token_ids, rows)


def load_rows(path: Path) -> tuple[list[int], dict[str, torch.Tensor]]:
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        token_ids = json.loads(handle.metadata()["token_ids"])
    return token_ids, load_file(str(path))


def rows_digest(token_ids: list[int], rows: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(token_ids).encode())
    for name in sorted(rows):
        digest.update(name.encode())
        digest.update(rows[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
