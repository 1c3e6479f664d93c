"""PEFT adapters as experts: create a fresh one, load a saved one, save one.

Owns the translation of AdapterConfig into a PEFT LoraConfig (LoRA on the target modules plus the
indicator rows as PEFT trainable tokens, tied to the output head when the base ties them), and
the rule that only the newest adapter trains. Saved experts are plain PEFT directories; they are
only ever read from safetensors, never with pickle.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from seecl.config import AdapterConfig, to_dict
from seecl.errors import StoreError
from seecl.model.indicators import Indicators
from seecl.publish import read_json_object


def peft_config(cfg: AdapterConfig, indicators: Indicators | None, invocation_tokens: list[int] | None = None):
    from peft import LoraConfig

    kwargs = {}
    if indicators is not None and cfg.train_indicator_rows and indicators.trainable_token_ids:
        kwargs["trainable_token_indices"] = indicators.trainable_token_ids
    if cfg.kind == "alora":
        if not invocation_tokens:
            raise ValueError("an aLoRA expert needs invocation tokens")
        kwargs["alora_invocation_tokens"] = list(invocation_tokens)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
        **kwargs,
    )


def invocation_tokens(cfg: AdapterConfig, header: list[int]) -> list[int] | None:
    """The tokens that invoke an expert of these settings, given the chat template's assistant
    header: None for a plain LoRA expert, the header or its last token for an aLoRA expert."""
    if cfg.kind != "alora":
        return None
    return list(header[-1:] if cfg.alora_invocation == "last_token" else header)


def cache_material(cfg: AdapterConfig) -> dict:
    """The settings an adapter cache key is built from. `alora_invocation` is left out where it
    changes nothing (LoRA experts) or keeps its default, so that experts cached before it existed
    keep their keys."""
    material = to_dict(cfg)
    if cfg.kind != "alora" or cfg.alora_invocation == "header":
        material.pop("alora_invocation")
    return material


def only_train(model, name: str) -> None:
    """Freeze everything but adapter `name` (old experts and the base never change)."""
    marker = f".{name}"
    for param_name, param in model.named_parameters():
        param.requires_grad = param_name.endswith(marker) or f"{marker}." in param_name


def add_expert(
    model,
    name: str,
    cfg: AdapterConfig,
    indicators: Indicators | None,
    seed: int,
    invocation_tokens: list[int] | None = None,
):
    """Attach a freshly initialised adapter `name` (never a copy of an older one), active and trainable."""
    from peft import PeftModel, get_peft_model

    config = peft_config(cfg, indicators, invocation_tokens)
    torch.manual_seed(seed)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    model.set_adapter(name)
    only_train(model, name)
    return model


def load_expert(model, name: str, directory: str | Path):
    """Load a saved adapter under `name`; returns the (possibly newly wrapped) PEFT model."""
    from peft import PeftModel

    directory = Path(directory)
    check_adapter_files(directory)
    if isinstance(model, PeftModel):
        model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    else:
        model = PeftModel.from_pretrained(model, str(directory), adapter_name=name, is_trainable=False)
    model.requires_grad_(False)
    return model


def check_adapter_files(directory: Path) -> None:
    """Refuse an adapter directory PEFT would fail on halfway (or read with pickle), naming the file,
    before anything is attached to the model."""
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise StoreError(f"{directory}: adapter_model.safetensors missing (pickled adapters are not loaded)")
    check_safetensors(weights)
    read_adapter_config(directory)


def read_adapter_config(directory: Path) -> dict:
    """`directory`'s adapter_config.json, or a StoreError naming the file: missing, unreadable, not
    JSON, not an object, or not PEFT's (no peft_type)."""
    config_file = Path(directory) / "adapter_config.json"
    config = read_json_object(config_file, "unreadable adapter config", StoreError)
    if "peft_type" not in config:
        raise StoreError(f"{config_file}: not a PEFT adapter config (no peft_type)")
    return config


def check_safetensors(path: Path) -> None:
    """A truncated or corrupt safetensors file is a one-line StoreError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise StoreError(f"{path}: corrupt safetensors file ({error})") from None


def save_expert(model, name: str, directory: str | Path) -> None:
    """Write adapter `name` as a plain PEFT directory (adapter_config.json + safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        # The indicator rows travel as trainable tokens; PEFT would otherwise copy the whole
        # resized embedding matrix into the first adapter it saves.
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
        source = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
        for item in source.iterdir():
            if item.is_file() and item.name != "README.md":
                shutil.move(str(item), directory / item.name)


def trainable_parameters(model, name: str) -> int:
    marker = f".{name}"
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(marker) or f"{marker}." in n)
