"""`seecl bench superni` end to end on the tiny model and SuperNI-format files written by the test:
the summary.json shape the issue fixes, the report and plots, resume, and `--reuse-experts`."""

import json
from pathlib import Path

import pytest

from conftest import TINY
from seecl.cli import main
from seecl.data.synthetic import general_task, make_task
from seecl.recipes import superni
from seecl.training import forbid_training

TASKS = ["uppercase", "add"]
METHODS = ["Non-rehearsal", "SEE(25%)"]


def write_jsonl(path, instances):
    with open(path, "w") as f:
        for inst in instances:
            f.write(json.dumps({"id": inst.id, "full_prompt": inst.query, "output": inst.references[0]}) + "\n")


@pytest.fixture
def benchmark_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in TASKS:
        write_jsonl(data / f"{name}.train.jsonl", make_task(name, "train", 16).instances)
        write_jsonl(data / f"{name}.dev.jsonl", make_task(name, "eval", 4).instances)
        write_jsonl(data / f"{name}.test.jsonl", make_task(name, "eval", 6).instances[2:])
    write_jsonl(data / "ood.jsonl", general_task().instances[:8])
    return data


def bench(data, out, *extra, methods=METHODS):
    return main(
        [
            "bench",
            "superni",
            "--data-dir",
            str(data),
            "--ood-file",
            str(data / "ood.jsonl"),
            "--order",
            ",".join(TASKS),
            "--methods",
            ",".join(methods),
            "--n-train",
            "16",
            "--n-eval",
            "4",
            "--n-ood",
            "4",
            "--out",
            str(out),
            *extra,
            *TINY,
            "train.epochs=3",
            "see.memory_tau=0.25",
            "generate.max_new_tokens=8",
        ]
    )


def test_bench_writes_summary_report_and_plots_then_resumes_and_reuses(benchmark_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert bench(benchmark_data, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["order"] == TASKS and summary["config"]["methods"] == METHODS
    assert list(summary["methods"]) == METHODS
    for m in summary["methods"].values():
        assert isinstance(m["AR"], float) and 0 <= m["AR"] <= 100
        assert m["BWT"] is None or isinstance(m["BWT"], float)
        assert len(m["matrix"]) == 2 and set(m["per_task"]) == set(TASKS)
        assert len(m["trainable_parameters"]) == 2
    see, plain = summary["methods"]["SEE(25%)"], summary["methods"]["Non-rehearsal"]
    assert 0 <= see["routing_f1"] <= 1 and 0 <= see["rb_acc"] <= 1 and see["routing"]["n_ood"] == 4
    assert plain["routing_f1"] is None and plain["rb_acc"] is None
    report = (out / "report.md").read_text()
    assert "| SEE(25%) |" in report and "| Non-rehearsal |" in report and "after add" in report
    assert (out / "per_task.png").stat().st_size > 0
    assert summary["config"]["run_config"]["model"]["name"] == "tiny-random", "resolved config beside the results"

    # The same command again: nothing is trained, the numbers are the same.
    with forbid_training():
        assert bench(benchmark_data, out) == 0
    again = json.loads((out / "summary.json").read_text())
    assert {k: m["AR"] for k, m in again["methods"].items()} == {k: m["AR"] for k, m in summary["methods"].items()}

    # A new eval split in a new directory reuses the trained adapters and only evaluates.
    other = tmp_path / "test-split"
    assert bench(benchmark_data, other, "--eval-split", "test", "--reuse-experts", str(out)) == 0
    scored = json.loads((other / "summary.json").read_text())
    assert scored["config"]["eval_split"] == "test" and list(scored["methods"]) == METHODS


def test_bench_rejects_an_oversized_ood_test_set(benchmark_data, tmp_path, capsys):
    code = main(
        [
            "bench",
            "superni",
            "--data-dir",
            str(benchmark_data),
            "--ood-file",
            str(benchmark_data / "ood.jsonl"),
            "--order",
            ",".join(TASKS),
            "--methods",
            "SEE(25%)",
            "--n-train",
            "16",
            "--n-eval",
            "4",
            "--n-ood",
            "5",
            "--out",
            str(tmp_path / "x"),
            *TINY,
        ]
    )
    assert code == 2 and "n_ood=5 exceeds the first half" in capsys.readouterr().err


def test_a_missing_data_folder_or_task_file_is_one_error_before_anything_is_written(
    benchmark_data, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "x"
    assert bench(tmp_path / "nowhere", out) == 2
    assert f"{tmp_path / 'nowhere'}: no such folder; --data-dir names the folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert bench(Path("nowhere"), out) == 2
    assert f"nowhere: no such folder (relative to {tmp_path}); --data-dir" in capsys.readouterr().err
    assert bench(benchmark_data, out, "--order", f"{TASKS[0]},nope") == 2
    err = capsys.readouterr().err
    assert f"task 'nope' has no nope.train.jsonl here; tasks with training files: {', '.join(sorted(TASKS))}" in err
    assert bench(benchmark_data, out, "--eval-split", "val") == 2
    assert f"task '{TASKS[0]}' has no {TASKS[0]}.val.jsonl here" in capsys.readouterr().err
    assert bench(benchmark_data, out, "--ood-file", str(tmp_path / "lima.jsonl")) == 2
    assert f"{tmp_path / 'lima.jsonl'}: OOD file not found; --ood-file names it" in capsys.readouterr().err
    assert not out.exists()


def test_bench_refuses_a_one_label_classification_subset(tmp_path, capsys):
    """A label-sorted sentiment file gave SuperNI-mini a one-label task; the benchmark refuses it."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"id": f"sa-{i}", "full_prompt": f"Review {i}: good or bad?", "output": "positive" if i < 20 else "negative"}
        for i in range(40)
    ]
    (data / "sa.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "sa.dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl(data / "ood.jsonl", general_task().instances[:8])
    # later options win: the helper's order and sizes are replaced
    code = bench(data, tmp_path / "x", "--order", "sa", "--n-train", "10", "--n-eval", "10", methods=["MTL"])
    err = capsys.readouterr().err
    assert code == 2 and "sa.train.jsonl: classification task 'sa'" in err and "{'positive': 10}" in err


def test_rows_computed_on_other_data_leave_the_summary(benchmark_data, tmp_path, capsys):
    """Regression: after the classification files were fixed, the rows of methods not run again
    stayed in summary.json and report.md with scores of the old data."""
    out = tmp_path / "run"
    assert bench(benchmark_data, out) == 0
    changed = make_task(TASKS[1], "train", 17).instances[1:]  # other training data for the second task
    write_jsonl(benchmark_data / f"{TASKS[1]}.train.jsonl", changed)
    capsys.readouterr()
    assert bench(benchmark_data, out, methods=["Non-rehearsal"]) == 0
    assert "computed on other data" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["Non-rehearsal"], "SEE's row was scored on the old data"
    assert "| SEE(25%) |" not in (out / "report.md").read_text()


def test_the_report_names_the_settings_a_run_changed_for_every_method():
    from seecl.config import RunConfig, from_dict, merge_overrides, to_dict
    from seecl.recipes.superni import BenchConfig, changed_settings

    cfg = BenchConfig(run={"train.lr": "2e-3", "train.checkpoint_every": 25, "train.epochs": 8})
    run_config = from_dict(RunConfig, merge_overrides(to_dict(RunConfig()), ["train.lr=2e-3", "train.epochs=8"]))
    assert changed_settings(cfg, run_config) == " Changed for every method: train.epochs=8, train.lr=0.002."
    assert changed_settings(BenchConfig(run={"train.checkpoint_every": 25}), RunConfig()) == ""


def test_a_rerun_with_other_settings_recomputes_and_keeps_the_old_state(benchmark_data, tmp_path, capsys):
    """Regression: a rerun into the same OUT with another setting (here adapter.r) trained nothing
    and reported the old row as computed with the new setting."""
    out = tmp_path / "run"
    assert bench(benchmark_data, out) == 0
    before = json.loads((out / "summary.json").read_text())["methods"]
    workdir = out / "methods" / "Non-rehearsal"
    assert json.loads((workdir / "settings.json").read_text())["adapter.r"] == 8

    # What only changes speed or progress output keeps every result: nothing is trained again.
    with forbid_training():
        assert bench(benchmark_data, out, "train.checkpoint_every=3", "generate.batch_size=3") == 0
    assert json.loads((out / "summary.json").read_text())["methods"] == before

    capsys.readouterr()
    assert bench(benchmark_data, out, "adapter.r=2", methods=["Non-rehearsal"]) == 0
    log = capsys.readouterr().out
    assert "computed with other settings (adapter.r: 8 -> 2)" in log
    assert "dropped from" in log and "SEE(25%)" in log, "the other row was computed with r=8"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["Non-rehearsal"]
    assert (
        summary["methods"]["Non-rehearsal"]["trainable_parameters"] != before["Non-rehearsal"]["trainable_parameters"]
    )
    assert json.loads((workdir / "settings.json").read_text())["adapter.r"] == 2
    (aside,) = (out / "methods").glob("Non-rehearsal.replaced-*")
    assert (aside / "protocol.json").is_file(), "the old state is kept whole"
    assert json.loads((aside / "settings.json").read_text())["adapter.r"] == 8

    # Back to the first settings: the adapters trained then come from the cache.
    with forbid_training():
        assert bench(benchmark_data, out, methods=["Non-rehearsal"]) == 0
    again = json.loads((out / "summary.json").read_text())["methods"]["Non-rehearsal"]
    assert again["AR"] == before["Non-rehearsal"]["AR"]


def test_a_longer_order_reuses_the_scores_of_its_first_stages(benchmark_data, tmp_path, capsys):
    short = tmp_path / "short"
    assert bench(benchmark_data, short, "--order", TASKS[0]) == 0
    scored = json.loads((short / "summary.json").read_text())["methods"]
    capsys.readouterr()
    longer = tmp_path / "longer"
    assert bench(benchmark_data, longer, "--reuse-experts", str(short)) == 0
    log = capsys.readouterr().out
    summary = json.loads((longer / "summary.json").read_text())["methods"]
    for label in METHODS:
        assert f"{label} stage 1 {TASKS[0]}: scored by" in log
        assert summary[label]["reused_cells"] == 1
        assert summary[label]["matrix"][0][0] == scored[label]["matrix"][0][0]
        assert summary[label]["matrix"][1][1] is not None and summary[label]["AR"] is not None
    assert "(+1 cells reused)" in (longer / "report.md").read_text(), "the time column says it is not the whole cost"

    # Scores of other settings are not this run's, even on the same data.
    other = tmp_path / "other"
    assert bench(benchmark_data, other, "--reuse-experts", str(short), "adapter.r=2", methods=["Non-rehearsal"]) == 0
    assert "reused" not in capsys.readouterr().out
    assert json.loads((other / "summary.json").read_text())["methods"]["Non-rehearsal"]["reused_cells"] == 0


def test_result_settings_read_back_from_settings_json_unchanged():
    from seecl.config import RunConfig
    from seecl.recipes.superni import SPEED_SETTINGS, BenchConfig, result_settings

    run_config = RunConfig()
    run_config.adapter.targets = ("q_proj", "v_proj")  # a tuple would read back as a list
    settings = result_settings(BenchConfig(), run_config, general_task())
    assert json.loads(json.dumps(settings)) == settings
    assert settings["adapter.targets"] == ["q_proj", "v_proj"] and settings["train.lr"] == run_config.train.lr
    assert not set(SPEED_SETTINGS) & set(settings)


def test_a_mistyped_reuse_or_output_directory_is_refused(benchmark_data, tmp_path, capsys):
    assert bench(benchmark_data, tmp_path / "run", "--reuse-experts", str(tmp_path / "no-such-run")) == 2
    assert "no-such-run is not a `seecl bench` output directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    assert bench(benchmark_data, tmp_path / "run", "--order", "uppercase,../../etc/passwd") == 2
    assert "invalid task name '../../etc/passwd'" in capsys.readouterr().err
    assert bench(benchmark_data, tmp_path / "run", "--eval-split", "../../etc/x") == 2
    assert "invalid eval split name '../../etc/x'" in capsys.readouterr().err
    assert bench(benchmark_data, tmp_path / "run", "--order", "4") == 2
    assert "order 4 is not one of the SEE paper's orders 1, 2, 3" in capsys.readouterr().err
    assert bench(benchmark_data, tmp_path / "run", methods=["SEE(200%)"]) == 2
    assert "'SEE(200%)': the share must be between 0% and 100%" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "a mistyped label leaves no folder behind"
    assert bench(benchmark_data, tmp_path / "run", "--n-train", "17") == 2
    assert "uppercase.train.jsonl: holds 16 instances; n_train=17 asks for more" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert bench(benchmark_data, tmp_path / "a-file") == 2
    assert "a-file exists and is not a directory" in capsys.readouterr().err


def test_a_second_run_into_the_same_directory_is_turned_away(benchmark_data, tmp_path, capsys):
    """Two runs into one OUT would each rewrite summary.json from their own copy, dropping the
    other's rows; the second is refused, naming the first."""
    import os

    from seecl.publish import held

    out = tmp_path / "run"
    with held(out / ".bench.lock", "seecl bench superni --methods SEE(10%)"):
        assert bench(benchmark_data, out) == 2
    err = capsys.readouterr().err
    assert "is busy: seecl bench superni --methods SEE(10%)" in err and f"pid {os.getpid()}" in err
    assert not (out / "summary.json").exists()
    assert bench(benchmark_data, out, methods=["Non-rehearsal"]) == 0, "the lock goes with its holder"


def test_unreadable_settings_and_protocol_files_cost_a_recompute_not_a_crash(benchmark_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert bench(benchmark_data, out, methods=["Non-rehearsal"]) == 0
    workdir = out / "methods" / "Non-rehearsal"
    reused = tmp_path / "reused"
    (reused / "methods" / "Non-rehearsal").mkdir(parents=True)
    (reused / "methods" / "Non-rehearsal" / "settings.json").write_bytes((workdir / "settings.json").read_bytes())
    (reused / "methods" / "Non-rehearsal" / "protocol.json").write_bytes(b"\xff{not json")
    (workdir / "settings.json").write_bytes(b"\xff\xfe{")
    capsys.readouterr()
    assert bench(benchmark_data, out, "--reuse-experts", str(reused), methods=["Non-rehearsal"]) == 0
    assert "computed with other settings" in capsys.readouterr().out
    assert list((out / "methods").glob("Non-rehearsal.replaced-*")), "the unreadable state is kept aside"
    assert json.loads((workdir / "settings.json").read_text())["label"] == "Non-rehearsal"


def test_two_replacements_within_one_second_keep_both_old_states(tmp_path, monkeypatch):
    """Regression: the second of two quick reruns with other settings crashed (Directory not empty)
    renaming onto the first one's `.replaced-<time>` directory of the same second."""
    monkeypatch.setattr(superni.time, "strftime", lambda fmt: "20261204-143135")
    workdir = tmp_path / "methods" / "SEE(10%)"
    for r in (8, 4, 2):
        superni.claim_workdir(workdir, {"label": "SEE(10%)", "adapter.r": r}, log=lambda *_: None)
        (workdir / "protocol.json").write_text(json.dumps({"r": r}))
    asides = sorted(p.name for p in tmp_path.joinpath("methods").glob("SEE(10%).replaced-*"))
    assert asides == ["SEE(10%).replaced-20261204-143135", "SEE(10%).replaced-20261204-143135-2"]
    kept = {json.loads((tmp_path / "methods" / name / "protocol.json").read_text())["r"] for name in asides}
    assert kept == {8, 4}, "each old state is kept whole, none overwritten"
    assert json.loads((workdir / "settings.json").read_text())["adapter.r"] == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"order": []}, "order names no task"),
        ({"order": ["qa", "qa"]}, "order must name distinct tasks"),
        ({"methods": []}, "methods names no method"),
        ({"methods": ["MTL", "MTL"]}, "methods must be distinct labels"),
    ],
)
def test_an_empty_or_repeated_order_or_method_list_is_refused_with_what_is_wrong(fields, message):
    """`--order ''` used to be told its tasks were not distinct; an empty list now says it is empty."""
    from seecl.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        superni.BenchConfig(**fields)
