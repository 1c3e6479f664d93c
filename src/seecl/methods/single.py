"""One LoRA adapter on the frozen base, trained by plain SFT and answering directly.

The building block of the baselines (MTL, AvgSTL, Non-rehearsal, RandSel, KMeansSel, SSR): `fit`
trains an adapter on instances, optionally continuing from an earlier adapter, through the
adapter cache (an identical run is loaded instead of repeated); `answer` decodes greedily with the
active adapter. No indicators: prompts and targets are the plain chat format.
"""

from __future__ import annotations

from collections.abc import Sequence

from seecl import training
from seecl.adapters import (
    add_expert,
    cache_material,
    load_expert,
    only_train,
    save_expert,
    trainable_parameters,
)
from seecl.cache import cache_key
from seecl.data.prompts import PromptFormatter
from seecl.data.task import Instance
from seecl.methods.base import MODEL, MethodContext, unrouted
from seecl.model.base import Base, load_base
from seecl.model.generation import greedy_generate
from seecl.serving.routing import Answer, Route
from seecl.training import run_fingerprint


class SingleAdapter:
    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self._base: Base | None = None
        self.model = None  # PeftModel once an adapter exists
        self.active: str | None = None  # cache key of the active adapter

    @property
    def base(self) -> Base:
        if self._base is None:
            self._base = load_base(self.ctx.config.model)
        return self._base

    @property
    def formatter(self) -> PromptFormatter:
        cfg = self.ctx.config
        return PromptFormatter(self.base.tokenizer, None, cfg.model.system_prompt, cfg.train.max_length)

    def key(self, instances: Sequence[Instance], init: str | None) -> str:
        cfg = self.ctx.config
        examples = [self.formatter.sft_example(i.query, i.response) for i in instances]
        return cache_key(
            kind="sft",
            model=cfg.model.name,
            system=cfg.model.system_prompt,
            indicator=cfg.model.indicator,
            adapter=cache_material(cfg.adapter),
            run=run_fingerprint(examples, cfg.train),
            init=init,
        )

    def _adapter_name(self, key: str) -> str:
        return f"a{key[:12]}"

    def _drop_others(self, keep: str) -> None:
        for name in list(getattr(self.model, "peft_config", {})):
            if name != keep:
                self.model.delete_adapter(name)

    def activate(self, key: str) -> None:
        """Make the cached adapter `key` the active one."""
        if key == self.active:
            return
        name = self._adapter_name(key)
        entry = self.ctx.cache.get(key)
        if entry is None:
            raise KeyError(f"adapter {key} is not in the cache")
        model = self.model if self.model is not None else self.base.model
        if name not in getattr(model, "peft_config", {}):
            model = load_expert(model, name, entry)
        model.set_adapter(name)
        self.model = model
        self._drop_others(name)
        self.active = key

    def fit(self, instances: Sequence[Instance], init: str | None = None, desc: str = "train") -> tuple[str, dict]:
        """Train (or load from the cache) an adapter on `instances`, continuing from `init`."""
        key = self.key(instances, init)
        if self.ctx.cache.get(key) is not None:
            self.activate(key)
            return key, {**self.ctx.cache.meta(key), "cached": True, "cache_key": key}
        cfg = self.ctx.config
        name = self._adapter_name(key)
        model = self.model if self.model is not None else self.base.model
        if init is None:
            model = add_expert(model, name, cfg.adapter, None, cfg.train.seed)
        else:
            model = load_expert(model, name, self.ctx.cache.get(init))
            model.set_adapter(name)
            only_train(model, name)
        self.model = model
        examples = [self.formatter.sft_example(i.query, i.response) for i in instances]
        result = training.train(
            model,
            examples,
            cfg.train,
            self.base.tokenizer.pad_token_id,
            checkpoint_dir=self.ctx.workdir / "checkpoints" / key,
            desc=desc,
        )
        meta = {k: v for k, v in result.to_dict().items() if k != "losses"}
        meta["trainable_parameters"] = trainable_parameters(model, name)
        self.ctx.cache.put(key, lambda d: save_expert(model, name, d), meta)
        self.active = key
        self._drop_others(name)
        return key, {**meta, "cached": False, "cache_key": key}

    def generate(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], use_adapter: bool = True) -> list[str]:
        cfg, fmt = self.ctx.config, self.formatter
        model = self.model if self.model is not None else self.base.model
        if use_adapter or self.model is None:
            outputs = greedy_generate(
                model, prompts, budgets, fmt.eos_id, self.base.tokenizer.pad_token_id, cfg.generate.batch_size
            )
        else:
            with model.disable_adapter():
                outputs = greedy_generate(
                    model, prompts, budgets, fmt.eos_id, self.base.tokenizer.pad_token_id, cfg.generate.batch_size
                )
        return [fmt.decode(o) for o in outputs]

    def answer(self, queries: Sequence[str], budgets: Sequence[int]) -> list[Answer]:
        prompts = [self.formatter.prompt_ids(q) for q in queries]
        return unrouted(self.generate(prompts, budgets), queries)

    def parameters_of(self, key: str) -> int:
        return int(self.ctx.cache.meta(key).get("trainable_parameters", 0))

    def close(self) -> None:
        self.model = None
        self._base = None


class OneModelMethod:
    """What the unrouted baselines share: one `SingleAdapter` that answers every query directly."""

    routed = False
    stage_cache = True

    def __init__(self, ctx: MethodContext, label: str):
        self.ctx, self.label = ctx, label
        self.single = SingleAdapter(ctx)

    def answer(self, queries: Sequence[str], budgets: Sequence[int]) -> list[Answer]:
        return self.single.answer(queries, budgets)

    def routes(self, queries: Sequence[str]) -> list[Route]:
        return [Route(MODEL, "direct") for _ in queries]

    def close(self) -> None:
        self.single.close()
