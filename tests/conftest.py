"""Shared fixtures: the tiny random model (built in-process, never downloaded) and tiny configs."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

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


# The three synthetic tasks most routing tests learn, oldest first.
TASKS = ["reverse_list", "uppercase", "add"]


def learn_ensemble(root, overrides: list[str], names=TASKS):
    """A SEE ensemble at `root`, one expert per task of `names` (48 training instances each),
    learned with the config `overrides` (callers pass TINY plus their own)."""
    from seecl.config import load_config
    from seecl.data.synthetic import make_task
    from seecl.see.ensemble import SeeEnsemble

    ens = SeeEnsemble(root, load_config(overrides=list(overrides)))
    for name in names:
        ens.learn(make_task(name, "train", 48))
    return ens


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


def wait_until(condition, what: str, deadline_s: float = 60.0) -> None:
    """Poll until `condition()`; the deadline only turns a hang into a failure."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def running(app):
    """The app under uvicorn in a background thread, on a free port chosen by the OS."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
