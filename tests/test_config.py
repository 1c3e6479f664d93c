"""Typed configuration: documented defaults, YAML and command-line overrides, round trips of the
resolved config, presets, clear errors for invalid values."""

import pytest

from seecl.config import RunConfig, describe, load_config, parse_override, save_config
from seecl.errors import ConfigError


def test_defaults_are_valid_and_documented():
    cfg = RunConfig()
    assert cfg.see.tau == 0.1 and cfg.adapter.targets == ["q_proj", "v_proj"]
    rows = describe()
    assert rows and all(text for _, _, text in rows), "every field needs a doc"


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(overrides=["train.lr=1e-3", "adapter.targets=[q_proj, k_proj]", "model.system_prompt=null"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.adapter.targets == ["q_proj", "k_proj"]
    assert cfg.model.system_prompt is None
    assert parse_override("model.system_prompt=") == (["model", "system_prompt"], "")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 2\n  lr: 0.001\nsee:\n  tau: 0.05\n")
    cfg = load_config(path=path, overrides=["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.see.tau) == (5, 0.001, 0.05)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["see.tau=0.2", "adapter.r=4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path=tmp_path / "config.yaml") == cfg


def test_paper_preset():
    cfg = load_config(preset="paper")
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (2e-4, 3, 32)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown field"),
        ("train.epochs=abc", "must be an integer"),
        ("model.indicator=emoji", "must be one of"),
        ("see.tau=0.5", "exceeds see.memory_tau"),
        ("train.batch_size=6", "multiple of"),
        ("see.general_negatives=-1", "general_negatives must be >= 0"),
        ("nosection", "section.field=value"),
    ],
)
def test_invalid_values_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def _all_fields(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _all_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata.get("doc", "")


def test_every_setting_has_a_help_line():
    from seecl.config import RunConfig, ServerConfig, VllmConfig
    from seecl.recipes.superni import BenchConfig

    for cls in (RunConfig, ServerConfig, VllmConfig, BenchConfig):
        missing = [name for name, text in _all_fields(cls) if not text.strip()]
        assert not missing, f"{cls.__name__}: {missing}"


def test_command_line_options_come_from_the_dataclasses():
    import dataclasses

    from seecl.cli import build_parser
    from seecl.config import ServerConfig, load_config
    from seecl.options import overrides
    from seecl.recipes.superni import BenchConfig

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command, cls, skip in (("bench", BenchConfig, {"run"}), ("serve", ServerConfig, set())):
        flags = {flag for action in commands[command]._actions for flag in action.option_strings}
        wanted = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name not in skip}
        assert wanted <= flags, wanted - flags
    args = parser.parse_args(["bench", "superni", "--n-train", "7", "--methods", "MTL,SEE(10%)", "--order", "2"])
    bench = load_config(BenchConfig, overrides=overrides(args))
    assert bench.n_train == 7 and bench.methods == ["MTL", "SEE(10%)"]
    assert bench.order == ["trans", "sa", "qa", "sum", "qg"], "an order number names the paper's order"
    served = parser.parse_args(["serve", "--ensemble", "e", "--max-tokens", "9", "--allowed-hosts", "a,b"])
    assert sorted(overrides(served, "server.")) == ['allowed_hosts=["a", "b"]', "max_tokens=9"]
    assert overrides(served, "vllm.") == []
