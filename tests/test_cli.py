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
    assert "vllm.tensor_parallel_size" in out and "vllm.gpu_memory_utilization" in out


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
