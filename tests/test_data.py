"""Reading data: every supported format, and a clear error naming file and line for malformed, non-
UTF-8, mixed, duplicate or one-label input; limits and stratified samples."""

import json

import pytest

from seecl.data.formats import load_instances, load_task
from seecl.data.synthetic import SYNTHETIC_TASKS, make_task
from seecl.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_ssr_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.train.jsonl",
        [
            {"id": "a", "full_prompt": "Def\n\nQ1", "output": "A1", "task_name": "t"},
            {"id": "b", "full_prompt": "Def\n\nQ2", "output": "A2", "task_name": "t"},
        ],
    )
    task = load_task(path)
    assert task.name == "qa" and len(task) == 2
    assert task.instances[0].query == "Def\n\nQ1" and task.instances[0].response == "A1"


def test_plain_jsonl_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(5)])
    task = load_task(path, name="custom", limit=3)
    assert task.name == "custom" and [i.response for i in task.instances] == ["r0", "r1", "r2"]


def test_superni_task_json(tmp_path):
    path = tmp_path / "task001.json"
    path.write_text(
        json.dumps(
            {
                "Definition": ["Answer the question."],
                "Instances": [{"id": "x1", "input": "What?", "output": ["This", "That"]}],
            }
        )
    )
    (inst,) = load_instances(path)
    assert inst.query == "Answer the question.\n\nWhat?" and inst.references == ("This", "That")


def test_trace_folder(tmp_path):
    folder = tmp_path / "C-STANCE"
    folder.mkdir()
    for split in ("train", "eval", "test"):
        (folder / f"{split}.json").write_text(json.dumps([{"prompt": f"{split} p", "answer": "A"}]))
    assert load_instances(folder, split="test")[0].query == "test p"
    with pytest.raises(DataError, match="split must be one of"):
        load_instances(folder, split="dev")


def test_trace_split_keeps_folder_split_index_ids(tmp_path):
    folder = tmp_path / "FOMC"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([{"prompt": "p0", "answer": "a"}, {"prompt": "p1", "answer": "b"}]))
    assert [i.id for i in load_instances(folder)] == ["FOMC-train-0", "FOMC-train-1"]
    (folder / "train.json").write_text(json.dumps([{"prompt": "p0", "answer": "a"}, {"prompt": "p1"}]))
    with pytest.raises(DataError, match=r"train\.json\[1\]: missing field 'response' \(or 'completion', or TRACE"):
        load_instances(folder)
    # a JSON list's items are named as jq names them, counting from 0
    (folder / "train.json").write_text(json.dumps([{"prompt": "p0", "answer": "a"}, 3]))
    with pytest.raises(DataError, match=r"train\.json\[1\]: must be a JSON object$"):
        load_instances(folder)


def test_prompt_completion_jsonl_reads_like_prompt_response(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "c"}])
    assert load_task(path).instances[0].references == ("c",)
    from seecl.data.formats import SystemMessageSkipped

    system, user = {"role": "system", "content": "s"}, {"role": "user", "content": "q"}
    conversational = {"prompt": [system, user], "completion": [{"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "trl.jsonl", [conversational])
    with pytest.warns(SystemMessageSkipped, match="trl.jsonl"):
        assert [(i.query, i.references) for i in load_task(path).instances] == [("q", ("c",))]
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "q", "response": "r", "completion": "c"}])
    with pytest.raises(DataError, match=r"both\.jsonl:1: fields 'response' and 'completion' both hold the response"):
        load_task(both)


def chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": role, "content": text} for role, text in turns]}


def test_chat_jsonl_is_one_user_message_and_the_assistant_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            chat(("user", "Translate: cat"), ("assistant", "gato"), system="You are terse."),
            {
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Trans"}, {"type": "text", "text": "late: dog"}],
                    },
                    {"role": "assistant", "content": "perro"},
                ]
            },
        ],
    )
    from seecl.data.formats import SystemMessageSkipped

    with pytest.warns(SystemMessageSkipped, match=r"chat\.jsonl: system messages are skipped") as caught:
        task = load_task(path)
    assert len(caught) == 1  # once per file, though both lines carry one
    assert [(i.query, i.references) for i in task.instances] == [
        ("Translate: cat", ("gato",)),
        ("Translate: dog", ("perro",)),
    ]
    queries = write_jsonl(tmp_path / "queries.jsonl", [chat(("user", "just asking"))])
    assert [i.query for i in load_instances(queries, responses=False)] == ["just asking"]


@pytest.mark.parametrize(
    "record, error",
    [
        (chat(("user", "q")), r"one user message and the assistant's answer \(system .*\); found the turns \['user'\]"),
        (chat(("user", "q"), ("assistant", "a"), ("user", "q")), r".*found the turns \['user', 'assistant', 'user'\]"),
        (chat(("assistant", "a"), ("user", "q")), r".*found the turns \['assistant', 'user'\]"),
        (chat(("user", "q"), ("tool", "{}")), r"messages\[1\]: role 'tool' is not supported"),
        (chat(("user", "   "), ("assistant", "a")), r"the user message is empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            r"messages\[0\]: content parts of type image_url",
        ),
        ({"messages": [{"role": "user", "content": 7}]}, r"messages\[0\]: content must be a string or an array"),
        ({"messages": "hi"}, r"'messages' must be a non-empty list"),
    ],
)
def test_a_chat_line_that_is_not_one_exchange_names_file_line_and_turns(tmp_path, record, error):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(("user", "fine"), ("assistant", "ok")), record])
    with pytest.raises(DataError, match=r"c\.jsonl:2: (an instance is )?" + error):
        load_task(path)


def test_alpaca_jsonl_and_json_list(tmp_path):
    records = [
        {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "blue"},
    ]
    jsonl = write_jsonl(tmp_path / "alpaca.jsonl", records)
    listed = tmp_path / "alpaca_data.json"
    listed.write_text(json.dumps(records))
    for path in (jsonl, listed):
        assert [(i.query, i.response) for i in load_task(path).instances] == [
            ("Add the numbers.\n\n2 + 3", "5"),
            ("Name a colour.", "blue"),
        ]
    listed.write_text(json.dumps(records + [{"instruction": "x", "input": 3, "output": "y"}]))
    with pytest.raises(DataError, match=r"alpaca_data\.json\[2\]: field 'input' must be a string"):
        load_task(listed)


def test_a_file_mixing_record_formats_names_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"prompt": "q", "response": "r"}, chat(("user", "q"), ("assistant", "a"))]
    )
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: this record is not in the file's format \(plain"):
        load_task(path)


def test_an_unknown_record_lists_the_formats_seecl_reads(tmp_path):
    path = write_jsonl(tmp_path / "io.jsonl", [{"input": "q", "output": "a"}])
    with pytest.raises(
        DataError, match=r"io\.jsonl:1: cannot tell the format: .*chat messages .*Alpaca.*found \['input', 'output'\]"
    ):
        load_task(path)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(DataError, match=r"scalar\.json: a \.json data file must be a SuperNI task object or a list"):
        load_task(scalar)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "response": "r"}\n{"prompt": "q2", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_task(path)


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_line_cut_short_is_reported_at_its_end_not_at_column_one(tmp_path, ending):
    # the line's own newline must not move the error to "column 1" of a line that is not there
    path = tmp_path / "cut.jsonl"
    path.write_bytes(('{"prompt": "q", "response": "r"}\n{"prompt": "q2", "response": "r2"' + ending).encode())
    with pytest.raises(DataError, match=r"cut\.jsonl:2: malformed JSON: Expecting ',' delimiter \(column 34\)"):
        load_task(path)


@pytest.mark.parametrize("name", ["deep.jsonl", "deep.json"])
def test_deeply_nested_json_is_a_data_error_not_a_recursion_traceback(tmp_path, name):
    path = tmp_path / name
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text('{"prompt": "q", "response": "r"}\n' + deep + "\n" if name.endswith("l") else deep)
    where = r"deep\.jsonl:2" if name.endswith("l") else r"deep\.json"
    with pytest.raises(DataError, match=where + r": malformed JSON: nested too deeply"):
        load_task(path)


def test_missing_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "response": "r"}, {"prompt": "q2"}])
    with pytest.raises(DataError, match=r"t\.jsonl:2: missing field 'response'"):
        load_task(path)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "q", "response": ""}, "response"),
        ({"prompt": "q", "completion": "  \n"}, "completion"),
        ({"instruction": "q", "input": "", "output": ""}, "output"),
        ({"full_prompt": "q", "output": ["", " "], "id": "x"}, "output"),
    ],
)
def test_an_empty_response_names_file_and_line(tmp_path, record, field):
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    with pytest.raises(DataError, match=rf"t\.jsonl:1: field '{field}' is empty"):
        load_task(path)
    assert len(load_instances(path, responses=False)) == 1  # queries alone: the response is not read


def test_empty_task_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_task(tmp_path / "empty.jsonl")


def test_duplicate_ids_are_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "1", "prompt": "a", "response": "b"}] * 2)
    with pytest.raises(DataError, match="duplicate instance id"):
        load_task(path)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_synthetic_tasks_are_deterministic_and_splits_disjoint(name):
    train, again = make_task(name, "train", 40), make_task(name, "train", 40)
    assert train == again
    evals = make_task(name, "eval", 20)
    assert not {i.query for i in train.instances} & {i.query for i in evals.instances}
    assert len({i.query for i in train.instances}) == 40
    assert make_task(name, "train", 40, seed=1) != train


def test_synthetic_tasks_are_distinct_instructions():
    firsts = {make_task(name, "train", 1).instances[0].query.split("\n")[0] for name in SYNTHETIC_TASKS}
    assert len(firsts) == len(SYNTHETIC_TASKS) >= 5


def test_synthetic_answers_are_correct():
    for inst in make_task("add", "train", 10).instances:
        a, b = inst.query.split("\n\n")[1].split(" + ")
        assert int(inst.response) == int(a) + int(b)
    for inst in make_task("reverse_list", "train", 10).instances:
        assert json.loads(inst.response) == json.loads(inst.query.split("\n\n")[1])[::-1]


def test_synthetic_spec_in_load_task():
    task = load_task("synthetic:uppercase", limit=5)
    assert task.name == "uppercase" and len(task) == 5


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "q", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_task(path)
    superni = tmp_path / "task.json"
    superni.write_bytes(b'{"Definition": ["d"],\n "Instances": [{"input": "\xff", "output": ["o"]}]}')
    with pytest.raises(DataError, match=r"task\.json:2: not UTF-8"):
        load_task(superni)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "q", "response": "r"}\n')
    assert load_task(path).instances[0].query == "q"
    # `cat a.jsonl b.jsonl` of two files saved with a BOM puts one at the start of a later line
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "q", "response": "r"}\n\xef\xbb\xbf{"prompt": "p", "response": "s"}\n')
    assert [i.query for i in load_task(path).instances] == ["q", "p"]


def test_unpaired_surrogate_escape_is_a_data_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "ok", "response": "r"}\n{"prompt": "bad \\ud800", "response": "r"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'prompt' holds an unpaired surrogate"):
        load_task(path)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(tmp_path, limit):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(3)])
    for source in (path, "synthetic:add"):
        with pytest.raises(DataError, match="limit must be a positive number"):
            load_task(source, limit=limit)


def _sorted_labels(tmp_path, n=40):
    records = [{"prompt": f"review {i}", "response": "positive" if i < n // 2 else "negative"} for i in range(n)]
    return write_jsonl(tmp_path / "sa.train.jsonl", records)


def test_limit_on_a_label_sorted_file_warns_and_sample_keeps_the_balance(tmp_path):
    from seecl.data.formats import LabelOrderWarning

    path = _sorted_labels(tmp_path)
    with pytest.warns(LabelOrderWarning, match="looks sorted by label"):
        head = load_task(path, limit=10)
    assert set(head.labels()) == {"positive"}
    sample = load_task(path, sample=10, seed=3)
    assert sample.labels() == {"positive": 5, "negative": 5}
    assert sample.instances == load_task(path, sample=10, seed=3).instances, "seeded"
    assert sample.instances != load_task(path, sample=10, seed=4).instances
    ids = [i.id for i in sample.instances]
    assert ids == sorted(ids, key=lambda x: int(x.rsplit("-", 1)[1])), "file order kept"


def test_limit_on_a_balanced_file_does_not_warn(tmp_path):
    import warnings

    records = [{"prompt": f"r{i}", "response": ["positive", "negative"][i % 2]} for i in range(40)]
    path = write_jsonl(tmp_path / "sa.jsonl", records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_task(path, limit=10).labels() == {"positive": 5, "negative": 5}


def test_one_label_classification_subset_is_refused(tmp_path):
    from seecl.data.formats import require_labels

    path = _sorted_labels(tmp_path)
    with pytest.warns(UserWarning):
        head = load_task(path, limit=10)
    with pytest.raises(DataError, match=r"sa\.train\.jsonl: classification task 'sa'.*1 label\(s\) \{'positive': 10\}"):
        require_labels(head, path)
    require_labels(load_task(path), path)
