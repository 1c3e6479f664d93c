import json

from conftest import TINY
from seecl.cli import main


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
    assert f"{bad}:2: malformed JSON" in err and "Traceback" not in err


def test_bad_override_and_missing_ensemble(tmp_path, capsys):
    assert main(["learn", "--ensemble", str(tmp_path / "e"), "--data", "synthetic:add", "train.lrr=1"]) == 2
    assert "unknown field" in capsys.readouterr().err
    assert main(["ask", "--ensemble", str(tmp_path / "nothing"), "hello"]) == 2
    assert "no ensemble" in capsys.readouterr().err


def test_config_command_lists_documented_fields(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "see.tau" in out and "Rehearsal ratio" in out
