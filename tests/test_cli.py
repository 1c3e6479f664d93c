"""The `seecl` command line as a user meets it: learn then ask, one-line errors for bad data, names,
overrides and budgets, locks against a second learner, resuming a killed learn, serve settings."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import seecl
from conftest import TINY, wait_until
from seecl.cli import main

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")


def test_learn_then_ask_through_the_cli(tmp_path, capsys):
    ens = str(tmp_path / "ens")
    assert main(["learn", "--ensemble", ens, "--data", "synthetic:add", "--limit", "24", *TINY]) == 0
    # The second stage inherits the ensemble's base model without repeating model.name.
    assert (
        main(
            [
                "learn",
                "--ensemble",
                ens,
                "--data",
                "synthetic:uppercase",
                "--limit",
                "24",
                "--tau",
                "0.2",
                *[o for o in TINY if not o.startswith("model.")],
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "expert 'uppercase' added" in out and "5 negatives" in out
    query = "Add the two numbers and give only the sum.\n\n12 + 30"
    assert main(["ask", "--ensemble", ens, "--json", "--max-new-tokens", "4", query]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["query"] == query and answer["answered_by"] in ("add", "uppercase", "base")
    assert [c["expert"] for c in answer["checks"]][0] == "uppercase"
    assert main(["info", "--ensemble", ens]) == 0
    assert "2. uppercase" in capsys.readouterr().out


def test_bad_data_is_one_clear_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    code = main(["learn", "--ensemble", str(tmp_path / "e"), "--data", str(bad), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err and "at at" not in err


def test_bad_override_and_missing_ensemble(tmp_path, capsys):
    assert main(["learn", "--ensemble", str(tmp_path / "e"), "--data", "synthetic:add", "train.lrr=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    assert main(["ask", "--ensemble", str(tmp_path / "nothing"), "hello"]) == 2
    assert "no ensemble" in capsys.readouterr().err


def test_config_command_lists_documented_fields(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "see.tau" in out and "Rehearsal ratio" in out


@pytest.fixture(scope="module")
def small_ensemble(tmp_path_factory):
    ens = str(tmp_path_factory.mktemp("cli") / "ens")
    assert main(["learn", "--ensemble", ens, "--data", "synthetic:add", "--limit", "8", *TINY, "train.epochs=1"]) == 0
    return ens


@pytest.mark.parametrize("option,value", [("--name", None), ("--name", "../x"), ("--name", "a/b"), ("--task", "../t")])
def test_names_are_checked_before_anything_is_loaded_or_written(tmp_path, capsys, option, value):
    """Regression: `--name /some/abs/dir` trained, then deleted /some/abs/dir/checkpoint."""
    outside = tmp_path / "outside"
    (outside / "checkpoint").mkdir(parents=True)
    (outside / "checkpoint" / "keep.txt").write_text("mine")
    ens = tmp_path / "ens"
    code = main(["learn", "--ensemble", str(ens), "--data", "synthetic:add", option, value or str(outside), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "invalid" in err and "name" in err and "Traceback" not in err
    assert (outside / "checkpoint" / "keep.txt").read_text() == "mine"
    assert not ens.exists(), "nothing was created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside"]


@pytest.mark.parametrize("where", ["afile", "afile/ens"])
def test_a_file_where_a_directory_goes_is_a_one_line_error(tmp_path, capsys, where):
    """Regression: `learn --ensemble FILE` raised FileExistsError from the lock's mkdir."""
    (tmp_path / "afile").write_text("mine")
    commands = [
        ["learn", "--ensemble", str(tmp_path / where), "--data", "synthetic:add", *TINY],
        ["demo", "--out", str(tmp_path / where), *TINY],
    ]
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / where}: cannot be used as a directory ({tmp_path / 'afile'} is a file)" in err
        assert "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_second_learner_fails_at_once_naming_the_first(small_ensemble, capsys):
    """Regression: two `seecl learn` on one ensemble both succeeded, the later expert trained
    without the earlier one's queries as negatives."""
    from seecl.see.store import EnsembleStore

    store = EnsembleStore(small_ensemble)
    before = store.manifest_path.read_text()
    with store.learning("`seecl learn` of expert 'first'"):
        code = main(["learn", "--ensemble", small_ensemble, "--data", "synthetic:uppercase", "--limit", "8", *TINY[1:]])
    err = capsys.readouterr().err
    assert code == 2 and "is busy" in err and "expert 'first'" in err and f"pid {os.getpid()}" in err
    assert store.manifest_path.read_text() == before


def test_a_commit_is_refused_when_the_ensemble_changed_meanwhile(small_ensemble):
    from seecl.errors import StoreError
    from seecl.see.store import EnsembleStore, QueryMemory

    store = EnsembleStore(small_ensemble)
    with pytest.raises(StoreError, match="changed while expert 'late' was trained"):
        store.commit_expert("late", lambda d: None, {}, QueryMemory("late", 1, ()), {}, after=[])


def test_non_utf8_data_and_queries_are_one_line_errors(small_ensemble, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    assert main(["learn", "--ensemble", str(tmp_path / "e"), "--data", str(bad), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8" in err and "Traceback" not in err
    assert main(["ask", "--ensemble", small_ensemble, "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8" in err and "Traceback" not in err
    result = subprocess.run(
        [sys.executable, "-m", "seecl.cli", "ask", "--ensemble", small_ensemble],
        input=b"fine\n\xff\xfe broken\n",
        capture_output=True,
        env=ENV,
    )
    assert result.returncode == 2 and b"<stdin>:2: not UTF-8" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_refused(tmp_path, capsys, limit):
    """Regression: `--limit 0` with synthetic data meant 64, `--limit -1` dropped the last line."""
    assert main(["learn", "--ensemble", str(tmp_path / "e"), "--data", "synthetic:add", "--limit", limit, *TINY]) == 2
    assert "limit must be a positive number" in capsys.readouterr().err


def test_ask_refuses_a_negative_budget_and_empty_queries(small_ensemble, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--ensemble", small_ensemble, "--max-new-tokens", "-5", "hi"])
    assert exit_info.value.code == 2 and "must be >= 0" in capsys.readouterr().err
    assert main(["ask", "--ensemble", small_ensemble, "hi", "  "]) == 2
    assert "query 2 is empty" in capsys.readouterr().err
    assert main(["ask", "--ensemble", small_ensemble, "--json", "--max-new-tokens", "0", "hi"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["answer"] == "" and answer["answered_by"] in ("add", "base"), "0 routes without answering"


def test_a_closed_pipe_is_not_a_traceback(small_ensemble):
    """Regression: `seecl info | head` raised BrokenPipeError."""
    for command in (["info", "--ensemble", small_ensemble, "--json"], ["config"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "seecl.cli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
        )
        process.stdout.close()  # the reader is gone before the first line is written
        _, err = process.communicate(timeout=120)
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
        assert process.returncode == 141


def test_learn_leaves_no_work_directory_and_checkpoints_by_default(small_ensemble):
    from seecl.config import TrainConfig

    assert not (Path(small_ensemble) / ".work").exists(), "regression: an empty .work/<name> stayed behind"
    assert TrainConfig().checkpoint_every > 0


def test_a_killed_learn_resumes_from_its_checkpoint(tmp_path):
    """Regression: checkpoints were off by default, so a killed learn restarted from step 0."""
    ens = tmp_path / "ens"
    args = ["learn", "--ensemble", str(ens), "--data", "synthetic:add", "--limit", "64", *TINY, "train.epochs=40"]
    process = subprocess.Popen([sys.executable, "-m", "seecl.cli", *args], env=ENV, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (ens / ".work" / "add" / "checkpoint" / "state.pt").exists(), "a checkpoint", 300)
    finally:
        process.kill()
        process.communicate()
    assert main(args) == 0
    from seecl.see.store import EnsembleStore

    [record] = EnsembleStore(ens).records()
    assert record["metrics"]["resumed_from_step"] >= 50
    assert not (ens / ".work").exists()


def test_serve_takes_server_settings_and_a_key_from_the_environment(small_ensemble, monkeypatch, capsys):
    import seecl.serving.server

    served = []
    monkeypatch.setattr(seecl.serving.server, "serve", lambda app, host, port: served.append((app, host, port)))
    monkeypatch.setenv("SEECL_API_KEY", "from-env")
    args = ["serve", "--ensemble", small_ensemble, "--set", "server.max_tokens=7", "--set", "see.threshold=0.9"]
    assert main(args) == 0
    [(app, host, port)] = served
    config = app.state.config
    assert (config.max_tokens, config.default_max_tokens, config.api_key) == (7, 7, "from-env")
    assert config.allowed_hosts == ["localhost", "127.0.0.1", "::1"] and (host, port) == ("127.0.0.1", 8000)
    assert "API key required" in capsys.readouterr().out
    assert main([*args, "--set", "server.default_max_tokens=5", "--api-key", "flag", "--host", "0.0.0.0"]) == 0
    config = served[-1][0].state.config
    assert (config.max_tokens, config.default_max_tokens, config.api_key, config.allowed_hosts) == (7, 5, "flag", ["*"])
    assert main([*args, "--set", "server.nope=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "server.api_key" in out and "vllm.tensor_parallel_size" in out and "vllm.gpu_memory_utilization" in out


def empty_ensemble(root):
    from seecl.model.indicators import install_indicators
    from seecl.model.tiny import build_tiny_model, build_tiny_tokenizer
    from seecl.see.store import EnsembleStore

    tokenizer = build_tiny_tokenizer()
    indicators = install_indicators(build_tiny_model(tokenizer), tokenizer, "added")
    model = {"name": "tiny-random", "indicator": "added", "system_prompt": None, "device": "auto", "dtype": "auto"}
    EnsembleStore(root).create(model, indicators.to_dict(), len(tokenizer), tokenizer)
    return str(root)


def test_the_vllm_backend_without_vllm_is_one_line_with_the_install_command(tmp_path, capsys):
    from seecl.serving.vllm_llm import vllm_available

    ens = empty_ensemble(tmp_path / "ens")
    assert main(["ask", "--ensemble", ens, "--set", "vllm.dtype=float32", "hello"]) == 2
    assert "vllm.* settings need --backend vllm" in capsys.readouterr().err
    assert main(["ask", "--ensemble", ens, "--backend", "vllm", "--set", "vllm.dtypo=float32", "hello"]) == 2
    assert "unknown field" in capsys.readouterr().err
    if vllm_available():
        return
    for command in (
        ["ask", "--ensemble", ens, "--backend", "vllm", "hello"],
        ["serve", "--ensemble", ens, "--backend", "vllm"],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "vLLM, which is not installed: pip install 'seecl[vllm]'" in err
        assert "make vllm-venv" in err and "Traceback" not in err


def test_learn_takes_a_stratified_sample_of_a_label_sorted_file(tmp_path, capsys):
    records = [{"prompt": f"review {i}", "response": "positive" if i < 20 else "negative"} for i in range(40)]
    data = tmp_path / "sa.train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ens = str(tmp_path / "e")
    assert main(["learn", "--ensemble", ens, "--data", str(data), "--sample", "8", *TINY, "train.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["info", "--ensemble", ens, "--json"]) == 0
    (expert,) = json.loads(capsys.readouterr().out)["experts"]
    assert expert["n_positives"] == 8
    assert main(["learn", "--ensemble", ens, "--data", str(data), "--sample", "8", "--limit", "8", *TINY]) == 2
    assert "either limit" in capsys.readouterr().err


def test_ask_reads_chat_files_and_says_once_that_system_messages_are_skipped(small_ensemble, tmp_path):
    line = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Add the two numbers and give only the sum.\n\n1 + 2"},
        ]
    }
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "seecl.cli", "ask", "--ensemble", small_ensemble, "--file", str(chat), "--json"]
        + ["--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    answers = [json.loads(row) for row in result.stdout.splitlines()]
    assert [a["query"] for a in answers] == [line["messages"][1]["content"]] * 2
    warnings = [row for row in result.stderr.splitlines() if "system messages are skipped" in row]
    assert len(warnings) == 1 and warnings[0].startswith(f"seecl: warning: {chat}: system messages are skipped")


def test_version_names_seecl_and_the_libraries_a_bug_report_needs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"seecl {seecl.__version__} (torch ")
    # the package's metadata takes its version from seecl/__init__.py, the one place that states it
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert not re.search(r"^version = \"", pyproject, re.M) and re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert re.search(r'^version = \{ attr = "seecl.__version__" \}$', pyproject, re.M)
    assert "transformers " in line and "peft " in line and f"Python {sys.version.split()[0]}" in line
