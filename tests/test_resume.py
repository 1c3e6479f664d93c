"""A continual run killed with SIGKILL mid-stage resumes and ends with the same results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY

TASKS = "reverse_list,uppercase,add"
SETTINGS = [*TINY, "adapter.dropout=0.1", "train.checkpoint_every=2", "train.epochs=10"]


def demo_command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "seecl.cli",
        "demo",
        "--out",
        str(out),
        "--tasks",
        TASKS,
        "--n-train",
        "24",
        "--n-eval",
        "6",
        *SETTINGS,
    ]


def run(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    return subprocess.run(demo_command(out), capture_output=True, text=True, env=env, timeout=600)


def expert_losses(out: Path) -> dict:
    root = out / "ensemble" / "experts"
    return {name: json.loads((root / name / "expert.json").read_text())["losses"] for name in TASKS.split(",")}


def test_sigkill_mid_stage_then_rerun_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    done = run(reference)
    assert done.returncode == 0, done.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    process = subprocess.Popen(demo_command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "ensemble" / ".work" / "uppercase" / "checkpoint" / "state.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert checkpoint.exists(), "stage 2 never wrote a step checkpoint"
    process.send_signal(signal.SIGKILL)
    process.wait()

    manifest = json.loads((interrupted / "ensemble" / "manifest.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == ["reverse_list"], "only finished stages are visible"
    assert not (interrupted / "results.json").exists()

    resumed = run(interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "expert 'reverse_list' already trained, skipping" in resumed.stderr
    meta = json.loads((interrupted / "ensemble" / "experts" / "uppercase" / "expert.json").read_text())
    assert meta["metrics"]["resumed_from_step"] > 0, "stage 2 restarted from its step checkpoint"

    assert expert_losses(interrupted) == expert_losses(reference)
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (interrupted, reference))
    for key in ("per_task", "routing_accuracy", "rouge_l", "ood_to_base"):
        assert ours[key] == theirs[key], key
    answers = [(d / "answers.jsonl").read_text() for d in (interrupted, reference)]
    assert answers[0] == answers[1]
