"""Experts with their own indicator rows rewritten as plain LoRA for vLLM (serving/vllm_experts.py):
plain PEFT, loading the rewrite onto the exported base, computes what the ensemble computes with the
original expert (tiny model, no vLLM). The real vLLM serves the same rewrites in tests/real_vllm/."""

import json

import pytest
import torch

from conftest import TINY, learn_ensemble
from seecl.data.synthetic import make_task
from seecl.serving.vllm_experts import EXPERTS_DIR, STAMP, ensure_expert, has_token_rows
from seecl.serving.vllm_export import export_base

NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def per_expert_rows(tmp_path_factory):
    """The default recipe: every expert trains its own indicator rows."""
    root = tmp_path_factory.mktemp("rows") / "ens"
    ens = learn_ensemble(root, TINY + ["see.calibrate=false", "see.general_negatives=0"], NAMES)
    base_dir = export_base(root, root.parent / "vllm-base")
    return ens, base_dir


def _peft_on_export(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def test_a_rewritten_expert_is_plain_lora_and_computes_what_the_original_computes(per_expert_rows):
    ens, base_dir = per_expert_rows
    queries = [i.query for n in NAMES for i in make_task(n, "eval", 2).instances]
    prompts = [ens.formatter().prompt_ids(q) for q in queries]
    for name in NAMES:
        original = ens.store.expert_dir(name)
        assert has_token_rows(original)
        rewritten = ensure_expert(ens.store.root, name, base_dir)
        assert rewritten == ens.store.root / EXPERTS_DIR / name
        config = json.loads((rewritten / "adapter_config.json").read_text())
        assert "trainable_token_indices" not in config
        assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
        peft = _peft_on_export(base_dir, rewritten)
        pos = ens.base.indicators.pos_ids
        for prompt in prompts:
            # the check (logits after the prompt) and the first answer step (after <<pos>>)
            ids = torch.tensor([prompt + list(pos)])
            with torch.no_grad():
                theirs = peft(input_ids=ids).logits[0]
                ours = _ensemble_logits(ens, name, ids)[0]
            assert torch.allclose(theirs, ours, atol=2e-5), (name, (theirs - ours).abs().max())


def _ensemble_logits(ens, name, ids):
    model = ens.model
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_rewrite_is_made_once_and_again_when_its_expert_or_base_changes(per_expert_rows, tmp_path):
    ens, base_dir = per_expert_rows
    name = NAMES[0]
    first = ensure_expert(ens.store.root, name, base_dir)
    stamp = (first / STAMP).stat().st_mtime_ns
    assert ensure_expert(ens.store.root, name, base_dir) == first
    assert (first / STAMP).stat().st_mtime_ns == stamp, "an up-to-date rewrite is kept"
    other_base = export_base(ens.store.root, tmp_path / "other-base")
    (other_base / "config.json").write_text((other_base / "config.json").read_text() + "\n")
    assert ensure_expert(ens.store.root, name, other_base) == first
    assert (first / STAMP).stat().st_mtime_ns != stamp, "made again over another base"
    source = json.loads((first / STAMP).read_text())["source"]
    assert (
        source["base"]["config.json"]
        == __import__("hashlib").sha256((other_base / "config.json").read_bytes()).hexdigest()
    )
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")], "no staging directory survives"


def test_a_plain_lora_expert_is_served_from_its_own_directory(tmp_path):
    root = tmp_path / "ens"
    learn_ensemble(root, TINY + ["model.indicator_rows=shared", "see.general_negatives=0"], NAMES[:2])
    base_dir = export_base(root, tmp_path / "base")
    from seecl.see.store import EnsembleStore

    store = EnsembleStore(root)
    second = store.expert_dir(NAMES[1])
    assert not has_token_rows(second)
    assert ensure_expert(root, NAMES[1], base_dir) == second
