"""Shared fixtures: the tiny random model (built in-process, never downloaded) and tiny configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

# Settings under which the tiny random model learns the synthetic tasks' indicators in seconds.
TINY = [
    "model.name=tiny-random",
    "train.lr=1e-2",
    "train.indicator_lr_scale=2",
    "train.epochs=8",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "adapter.dropout=0.0",
    "train.progress=false",
]


@pytest.fixture
def tiny_config():
    from seecl.config import load_config

    def make(*overrides: str):
        return load_config(overrides=TINY + list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_base():
    from seecl.config import ModelConfig
    from seecl.model.base import load_base

    return load_base(ModelConfig(name="tiny-random"))


@pytest.fixture
def fresh_tiny_base():
    from seecl.config import ModelConfig
    from seecl.model.base import load_base

    return load_base(ModelConfig(name="tiny-random"))
