"""Slow: the real default model (SmolLM2-135M-Instruct from PyPI, cached under SEECL_HOME)."""

import json

import pytest

from seecl.cli import main

pytestmark = pytest.mark.slow


def test_learn_and_ask_on_the_default_model(tmp_path, capsys):
    ens = str(tmp_path / "ens")
    common = ["model.system_prompt=", "train.progress=false"]
    assert main(["learn", "--ensemble", ens, "--data", "synthetic:sentiment", "--limit", "32", *common]) == 0
    assert (
        main(
            [
                "learn",
                "--ensemble",
                ens,
                "--data",
                "synthetic:uppercase",
                "--limit",
                "32",
                "--tau",
                "0.2",
                "train.progress=false",
            ]
        )
        == 0
    )
    capsys.readouterr()
    queries = [
        "Is this review positive or negative?\n\nThe pizza was wonderful and I will tell my friends.",
        "Rewrite the words in capital letters.\n\nlemon harbor",
    ]
    assert main(["ask", "--ensemble", ens, "--json", "--max-new-tokens", "8", *queries]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [a["answered_by"] for a in answers] == ["sentiment", "uppercase"]
    assert answers[0]["answer"] == "positive" and answers[1]["answer"] == "LEMON HARBOR"
