"""Safe by default: every expert declines general instructions from a pool that ships with seecl,
and routing thresholds are calibrated, unless the paper's recipe is asked for."""

import json

import pytest

from seecl.cache import AdapterCache
from seecl.config import load_config
from seecl.data.formats import load_instances
from seecl.data.general import BUILTIN_SOURCE, builtin_general, load_general
from seecl.data.synthetic import general_task
from seecl.errors import ConfigError
from seecl.methods.base import MethodContext
from seecl.methods.registry import build_method, parse_label


def test_the_builtin_pool_ships_with_the_package():
    pool = builtin_general()
    queries = [i.query for i in pool.instances]
    assert pool.source == BUILTIN_SOURCE and len(queries) == 599 and len(set(queries)) == 599
    assert all(q.strip() for q in queries) and all(i.references == () for i in pool.instances)
    assert load_general(None).instances == pool.instances


def test_the_pool_holds_none_of_the_questions_the_demo_scores():
    """Regression: "Why is the sky blue?" was both in the pool (a possible trained negative) and
    among the demo's held-out general questions."""
    pool = {i.query.strip().lower() for i in builtin_general().instances}
    assert not pool & {i.query.strip().lower() for i in general_task().instances}


def test_a_users_pool_needs_no_responses(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "What is a good name for a cat?"}\n{"prompt": "hi", "response": "hello"}\n')
    assert [i.query for i in load_general(path).instances] == ["What is a good name for a cat?", "hi"]
    with pytest.raises(Exception, match="missing field 'response'"):
        load_instances(path)  # training data still needs its responses


def test_defaults_and_the_paper_preset():
    see = load_config().see
    assert see.general_negatives == 10 and see.general_negatives_file is None and see.calibrate
    paper = load_config(preset="paper").see
    assert paper.general_negatives == 0 and not paper.calibrate


def context(tmp_path, **kwargs):
    from conftest import TINY

    return MethodContext(load_config(overrides=TINY), tmp_path / "m", AdapterCache(tmp_path / "c"), **kwargs)


def test_see_labels_keep_the_papers_recipe_whatever_the_defaults(tmp_path):
    plain = build_method("SEE(10%)", context(tmp_path)).ensemble.config
    assert plain.see.general_negatives == 0 and not plain.see.calibrate
    assert plain.model.indicator_rows == "per_expert"
    builtin = build_method("SEE(10%)-builtin-calibrated", context(tmp_path, general_negatives=7))
    assert builtin.ensemble.config.see.general_negatives == 7 and builtin.ensemble.config.see.calibrate
    assert builtin.general is None, "the pool that ships with seecl, never the benchmark's OOD file"
    bench = build_method("SEE(10%)-general", context(tmp_path, general=general_task()))
    assert bench.general is not None and bench.ensemble.config.see.general_negatives == 10


@pytest.mark.parametrize(
    "label, message",
    [
        ("SEE(10%)-general-builtin", "not both"),
        ("SEE", "needs a share"),
        ("MTL(10%)", "takes no"),
        ("RandSel(10%)-shared", "only SEE has variants"),
        ("Magic(3%)", "unknown method"),
        ("SEE(200%)", "between 0% and 100%"),
        ("RandSel(1.2.3%)", "not a number of percent"),
    ],
)
def test_bad_labels(tmp_path, label, message):
    with pytest.raises(ConfigError, match=message):
        build_method(label, context(tmp_path))


def test_every_table_row_parses():
    from seecl.methods.registry import METHODS

    for name, spec in METHODS.items():
        label = name if spec.tau == "none" else f"{name}(10%)"
        assert parse_label(label)[0] == name


def test_ask_file_takes_prompt_only_jsonl(tmp_path):
    from argparse import Namespace

    from seecl.cli import _read_queries

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "2 + 2?"}) + "\n")
    assert _read_queries(Namespace(query=["first"], file=str(path))) == ["first", "hello", "2 + 2?"]
