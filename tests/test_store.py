"""The ensemble store: what the manifest records, save/load round trips, plain-PEFT loading, crash
safety, name checks, no overwrites, no pickle."""

import json

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.errors import StoreError
from seecl.see.ensemble import SeeEnsemble
from seecl.see.store import EnsembleStore, QueryMemory


@pytest.fixture
def ensemble(tmp_path, tiny_config):
    ens = SeeEnsemble(tmp_path / "ens", tiny_config("train.epochs=2"))
    ens.learn(make_task("add", "train", 16))
    return ens


QUERIES = [make_task("add", "eval", 2).instances[0].query, make_task("uppercase", "eval", 2).instances[1].query]


def test_manifest_records_what_a_user_needs(ensemble):
    manifest = ensemble.store.manifest()
    assert manifest["model"]["name"] == "tiny-random"
    assert manifest["indicators"]["pos"] == "<<pos>>"
    (expert,) = manifest["experts"]
    assert expert["name"] == "add" and expert["task"] == "add"
    assert len(expert["data_fingerprint"]) == 64 and expert["metrics"]["steps"] > 0
    assert expert["config"]["see"]["tau"] == 0.1
    directory = ensemble.store.expert_dir("add")
    for name in ("adapter_config.json", "adapter_model.safetensors", "expert.json", "memory.jsonl", "config.yaml"):
        assert (directory / name).is_file(), name
    from safetensors import safe_open

    with safe_open(directory / "adapter_model.safetensors", "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    assert not any("embed_tokens.weight" in k or "lm_head" in k for k in shapes), "no full embedding copy"
    assert [v for k, v in shapes.items() if "trainable_tokens" in k] == [[2, 64]]


def test_save_load_round_trip_gives_identical_outputs(ensemble, tiny_config):
    before = ensemble.ask(QUERIES, 8)
    reopened = SeeEnsemble.open(ensemble.store.root)
    after = reopened.ask(QUERIES, 8)
    assert [a.to_dict() for a in before] == [a.to_dict() for a in after]
    ids = torch.tensor([reopened.formatter().prompt_ids(QUERIES[0])])
    ensemble.model.set_adapter("add")
    reopened.model.set_adapter("add")
    assert ensemble.model(ids).logits.equal(reopened.model(ids).logits)


def test_expert_loads_with_plain_peft_on_the_resized_base(ensemble, fresh_tiny_base):
    from peft import PeftModel

    plain = PeftModel.from_pretrained(fresh_tiny_base.model, str(ensemble.store.expert_dir("add")))
    ids = torch.tensor([ensemble.formatter().prompt_ids(QUERIES[0])])
    ensemble.model.set_adapter("add")
    assert torch.allclose(plain(ids).logits, ensemble.model(ids).logits, atol=1e-6)


def test_interrupted_write_leaves_previous_ensemble_intact(ensemble):
    store = ensemble.store
    manifest_before = store.manifest_path.read_text()

    def crash(directory):
        (directory / "adapter_config.json").write_text("{}")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        store.commit_expert("second", crash, {}, QueryMemory("second", 1, ()), {})
    assert store.manifest_path.read_text() == manifest_before
    assert store.expert_names() == ["add"]
    assert not any(p.name.startswith(".staging") for p in (store.root / "experts").iterdir())
    assert SeeEnsemble.open(store.root).ask(QUERIES[:1], 4)[0].route is not None


def test_orphan_from_a_crash_before_the_manifest_update_is_invisible(ensemble):
    store = ensemble.store
    orphan = store.root / "experts" / "ghost"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text("{}")
    assert store.expert_names() == ["add"]
    store.clean_staging()
    assert not orphan.exists() and store.expert_dir("add").is_dir()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "x" * 65, "a.b", "spa ce"])
def test_bad_expert_names_are_rejected(ensemble, bad):
    with pytest.raises(StoreError, match="invalid expert name"):
        ensemble.store.commit_expert(bad, lambda d: None, {}, QueryMemory("t", 1, ()), {})


def test_experts_are_never_overwritten(ensemble):
    with pytest.raises(StoreError, match="already exists"):
        ensemble.learn(make_task("add", "train", 4))


def test_adding_an_expert_does_not_modify_older_ones(ensemble):
    directory = ensemble.store.expert_dir("add")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    ensemble.learn(make_task("uppercase", "train", 8))
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert ensemble.experts() == ["add", "uppercase"]
    meta = ensemble.store.expert_meta("uppercase")
    assert sorted(meta["negative_ids"]) == ["add", "general"] and len(meta["negative_ids"]["add"]) == 2
    # by default every expert also declines general instructions from the pool that ships with seecl
    assert len(meta["negative_ids"]["general"]) == 10 and meta["general_pool"]["source"].startswith("seecl:")


def test_corrupt_or_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no ensemble"):
        EnsembleStore(tmp_path).manifest()
    for damaged in (b"{not json", b"\xff\xfe{", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000):
        (tmp_path / "manifest.json").write_bytes(damaged)
        with pytest.raises(StoreError, match="manifest.json: corrupt manifest"):
            EnsembleStore(tmp_path).manifest()


def test_pickled_adapters_are_refused(ensemble, fresh_tiny_base):
    from seecl.adapters import load_expert

    directory = ensemble.store.expert_dir("add")
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(StoreError, match="pickled adapters are not loaded"):
        load_expert(fresh_tiny_base.model, "add", directory)
    json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_weights", "adapter_model.safetensors: corrupt safetensors file"),
        ("garble_config", "adapter_config.json: unreadable adapter config"),
        ("foreign_config", "adapter_config.json: not a PEFT adapter config"),
    ],
)
def test_a_damaged_adapter_is_a_one_line_error_naming_its_file(ensemble, damage, message):
    # A truncated copy (a full disk, an interrupted rsync) used to surface as safetensors' traceback.
    directory = ensemble.store.expert_dir("add")
    weights, config = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garble_config":
        config.write_bytes(b"\xff\xfe{")
    else:
        config.write_text('{"r": 8}')
    with pytest.raises(StoreError, match=message):
        SeeEnsemble(ensemble.store.root).ask([QUERIES[0]])


def test_a_damaged_expert_record_or_query_memory_names_its_file(ensemble):
    store = ensemble.store
    memory = store.expert_dir("add") / "memory.jsonl"
    lines = memory.read_text(encoding="utf-8").splitlines()
    memory.write_text("\n".join([lines[0], '{"id": 3}', *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(StoreError, match=r"memory\.jsonl:2: a query memory line needs string 'id' and 'query'"):
        store.memory("add")
    memory.write_bytes(b"\xff\n")
    with pytest.raises(StoreError, match=r"memory\.jsonl:1: unreadable query memory"):
        store.memory("add")
    memory.write_bytes(b'{"id": "a", "query": "q"\n')  # cut short: the error is at the line's end
    cut = r"memory\.jsonl:1: unreadable query memory \(Expecting ',' delimiter: line 1 column 25"
    with pytest.raises(StoreError, match=cut):
        store.memory("add")
    (store.expert_dir("add") / "expert.json").write_text("[]", encoding="utf-8")
    with pytest.raises(StoreError, match=r"expert\.json: unreadable expert record"):
        store.expert_meta("add")
