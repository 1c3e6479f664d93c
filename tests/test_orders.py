"""`seecl orders`: one benchmark in several task orders, per-order AR/BWT and their mean."""

from __future__ import annotations

import json

import pytest

from seecl.cli import main
from seecl.errors import SeeclError
from seecl.evaluation.orders import across_orders, load_run, orders_markdown

CONFIG = {"data_dir": "data", "eval_split": "dev", "n_train": 100, "n_eval": 50, "ood_file": "ood", "n_ood": 100}


def write_run(root, name, order, methods, **config):
    run = root / name
    run.mkdir()
    rows = {label: {"AR": ar, "BWT": bwt, "settings": settings} for label, (ar, bwt, settings) in methods.items()}
    summary = {"config": {**CONFIG, "order": order, **config}, "methods": rows}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run


@pytest.fixture
def runs(tmp_path):
    return [
        write_run(tmp_path, "o1", ["a", "b", "c"], {"SEE": (40.0, 0.0, "s"), "MTL": (38.0, None, "m")}),
        write_run(tmp_path, "o2", ["c", "a", "b"], {"SEE": (41.0, -1.0, "s"), "MTL": (38.0, None, "m")}),
        write_run(tmp_path, "o3", ["b", "c", "a"], {"SEE": (42.0, -2.0, "s"), "SSR": (30.0, -5.0, "r")}),
    ]


def test_the_mean_counts_only_methods_every_order_holds(runs):
    result = across_orders([load_run(r) for r in runs])
    see, mtl, ssr = (result["methods"][k] for k in ("SEE", "MTL", "SSR"))
    assert see["AR"] == [40.0, 41.0, 42.0] and see["AR_mean"] == pytest.approx(41.0)
    assert see["BWT_mean"] == pytest.approx(-1.0) and see["complete"]
    assert mtl["AR"] == [38.0, 38.0, None] and mtl["AR_mean"] is None and mtl["why_not"] == "not in every run"
    assert ssr["AR"] == [None, None, 30.0] and ssr["AR_mean"] is None
    assert [r["order"] for r in result["runs"]] == [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]]
    table = orders_markdown(result)
    assert "| SEE | 40.0 | 41.0 | 42.0 | 41.0 | 0.0 | -1.0 | -2.0 | -1.0 |" in table
    assert "- (2): c → a → b" in table and "No mean, not in every run: MTL, SSR." in table


def test_a_method_trained_with_other_settings_in_one_order_gets_no_mean(tmp_path):
    first = write_run(tmp_path, "o1", ["a", "b"], {"SEE": (40.0, 0.0, "s")})
    second = write_run(tmp_path, "o2", ["b", "a"], {"SEE": (44.0, 0.0, "other")})
    result = across_orders([load_run(first), load_run(second)])
    assert result["methods"]["SEE"]["AR_mean"] is None
    assert result["methods"]["SEE"]["why_not"] == "settings differ between runs"


@pytest.mark.parametrize(
    "second_order, config, message",
    [
        (["a", "b", "d"], {}, "not the same tasks"),
        (["c", "b", "a"], {"n_train": 200}, "n_train=200"),
        (["c", "b", "a"], {"eval_split": "test"}, "eval_split='test'"),
        (["a", "b", "c"], {}, "learn the same order"),
    ],
)
def test_runs_of_different_benchmarks_are_refused(tmp_path, second_order, config, message):
    first = write_run(tmp_path, "o1", ["a", "b", "c"], {"SEE": (40.0, 0.0, "s")})
    second = write_run(tmp_path, "o2", second_order, {"SEE": (40.0, 0.0, "s")}, **config)
    with pytest.raises(SeeclError, match=message):
        across_orders([load_run(first), load_run(second)])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"\xff\xfe", "not a benchmark summary"),
        (b"[1]", "not a JSON object"),
        (b'{"config": {}}', "no methods"),
    ],
)
def test_a_missing_or_damaged_summary_names_its_file(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "summary.json").write_bytes(content)
    with pytest.raises(SeeclError, match=f"{run / 'summary.json'}.*{message}"):
        load_run(run)


def test_the_command_prints_the_table_and_writes_it(runs, tmp_path, capsys):
    out = tmp_path / "orders"
    assert main(["orders", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | AR (1) | AR (2) | AR (3) | AR mean |")
    assert printed.strip() in (out / "report.md").read_text(encoding="utf-8")
    assert json.loads((out / "summary.json").read_text())["methods"]["SEE"]["AR_mean"] == pytest.approx(41.0)
    assert main(["orders", *map(str, runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["methods"]["SEE"]["BWT"] == [0.0, -1.0, -2.0]
    assert main(["orders", str(runs[0])]) == 2
    assert "at least two runs" in capsys.readouterr().err
