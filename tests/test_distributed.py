"""The same `seecl learn` on two processes (DDP over gloo, CPU) equals the one-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ARGS = [
    "learn",
    "--data",
    "synthetic:reverse_list",
    "--limit",
    "16",
    "model.name=tiny-random",
    "train.lr=1e-2",
    "train.epochs=2",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "adapter.dropout=0.0",
    "train.progress=false",
]


def test_two_process_training_equals_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this interpreter")
    single = subprocess.run(
        [sys.executable, "-m", "seecl.cli", *ARGS[:1], "--ensemble", str(tmp_path / "one"), *ARGS[1:]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    # --standalone: rendezvous on a free port, so a busy 29500 on a shared machine cannot fail the run
    multi = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "seecl.cli",
            *ARGS[:1],
            "--ensemble",
            str(tmp_path / "two"),
            *ARGS[1:],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-4000:]
    assert multi.stdout.count("added to") == 1, "only the main process reports and publishes"
    one = load_file(tmp_path / "one" / "experts" / "reverse_list" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "experts" / "reverse_list" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() < 1e-5, key
