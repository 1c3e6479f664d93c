"""Methods that live inside the base model's adapted layers (MoSEs, SETA): the shared scaffolding.

Owns plain-torch wrappers injected around the target nn.Linear layers, frozen-base query features,
per-stage snapshots (safetensors + json) that make `learn` idempotent, and answering by grouping
queries by the task they are routed to. Each method's own layer and training live in its file.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from seecl import training
from seecl.adapters import cache_material
from seecl.config import to_dict
from seecl.data.prompts import PromptFormatter
from seecl.data.task import Task
from seecl.errors import ConfigError
from seecl.loss import causal_lm_parts
from seecl.methods.base import MethodContext
from seecl.model.base import Base, load_base
from seecl.model.generation import greedy_generate, left_pad
from seecl.publish import publish_dir
from seecl.serving.routing import BASE, Answer, Route

# ----------------------------------------------------------------------------- shared scaffolding


def generator(*material) -> torch.Generator:
    """A CPU generator seeded from `material` (independent of the global RNG and of call order)."""
    digest = hashlib.sha256(repr(material).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def wrap_targets(
    model: nn.Module, targets: Sequence[str], factory: Callable[[nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replace every nn.Linear whose attribute name is in `targets` by `factory(linear)`."""
    wrapped = {}
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        if leaf in targets and isinstance(module, nn.Linear):
            wrapper = factory(module)
            setattr(model.get_submodule(parent) if parent else model, leaf, wrapper)
            wrapped[name] = wrapper
    if not wrapped:
        raise ConfigError(f"adapter.targets {list(targets)} name no nn.Linear layer of the model")
    return wrapped


@torch.inference_mode()
def base_features(
    model: nn.Module, layers: Sequence[nn.Module], prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Mean over prompt tokens of the frozen base's last hidden state (wrappers bypassed)."""
    backbone, _ = causal_lm_parts(model)
    device = next(model.parameters()).device
    for layer in layers:
        layer.bypass = True
    try:
        rows = []
        for start in range(0, len(prompts), batch_size):
            inputs = left_pad(prompts[start : start + batch_size], pad_id, device)
            hidden = backbone(**inputs, use_cache=False).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
        return torch.cat(rows)
    finally:
        for layer in layers:
            layer.bypass = False


class StageStore:
    """One snapshot per finished stage: `<root>/stage-<i>/{state.safetensors, meta.json}`, atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def dir(self, stage: int) -> Path:
        return self.root / f"stage-{stage + 1}"

    def find(self, stage: int, signature: dict) -> dict | None:
        directory = self.dir(stage)
        if not (directory / "meta.json").is_file() or not (directory / "state.safetensors").is_file():
            return None
        meta = json.loads((directory / "meta.json").read_text())
        return meta if meta.get("signature") == signature else None

    def save(self, stage: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        def write(staging: Path) -> None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / "state.safetensors")
            )
            (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

        publish_dir(self.dir(stage), write, replace=True)

    def load(self, stage: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir(stage) / "state.safetensors"))


class LayerMethod:
    """A method living in wrappers around the target layers, routed by task inference.

    Subclasses provide `make_layer`, `reset` (fresh state), `train_task`, `snapshot`/`restore`,
    `choose` (task index per feature row), `activate` (task index or None) and `settings`.
    """

    schedule = "sequential"
    routed = True
    stage_cache = False  # stage snapshots live in the workdir (6-21 MB each), not in the adapter cache
    route_reason = "task_inference"

    def __init__(self, ctx: MethodContext, label: str):
        self.ctx, self.label, self.config = ctx, label, ctx.config
        self.store = StageStore(ctx.workdir / "stages")
        self._base: Base | None = None
        self.layers: dict[str, nn.Module] = {}
        self.tasks: list[str] = []  # tasks whose state is in memory, in order
        self.signature: dict | None = None  # identifies that state (None: fresh or unknown)

    # -- model -----------------------------------------------------------------------------------
    @property
    def base(self) -> Base:
        if self._base is None:
            self._base = load_base(self.config.model)
            self.layers = wrap_targets(self._base.model, self.config.adapter.targets, self.make_layer)
            self.reset()
        return self._base

    @property
    def model(self) -> nn.Module:
        return self.base.model

    @property
    def formatter(self) -> PromptFormatter:
        cfg = self.config
        return PromptFormatter(self.base.tokenizer, None, cfg.model.system_prompt, cfg.train.max_length)

    def features(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        return base_features(
            self.model,
            list(self.layers.values()),
            prompts,
            self.base.tokenizer.pad_token_id,
            self.config.generate.batch_size,
        )

    def task_features(self, task: Task, limit: int) -> torch.Tensor:
        """Frozen-base features of a seeded sample of the task's training queries."""
        rng = random.Random(f"features:{self.config.train.seed}:{task.name}")
        chosen = rng.sample(list(task.instances), min(limit, len(task)))
        return self.features([self.formatter.prompt_ids(i.query) for i in chosen])

    def examples(self, task: Task):
        return [self.formatter.sft_example(i.query, i.response) for i in task.instances]

    def fit(self, examples, stage: int, regularizer=None) -> dict:
        cfg = self.config
        result = training.train(
            self.model,
            examples,
            cfg.train,
            self.base.tokenizer.pad_token_id,
            checkpoint_dir=self.ctx.workdir / "checkpoints" / f"stage-{stage + 1}",
            desc=f"{self.label} stage {stage + 1}",
            regularizer=regularizer,
        )
        return {k: v for k, v in result.to_dict().items() if k != "losses"}

    # -- the Method protocol ---------------------------------------------------------------------
    def _signature(self, tasks: Sequence[Task]) -> dict:
        cfg = self.config
        run = {k: v for k, v in to_dict(cfg.train).items() if k not in ("progress", "checkpoint_every")}
        material = {
            "method": type(self).__name__,
            "settings": self.settings(),
            "model": cfg.model.name,
            "system": cfg.model.system_prompt,
            "adapter": cache_material(cfg.adapter),
            "train": run,
            "tasks": [[t.name, t.fingerprint()] for t in tasks],
        }
        return json.loads(json.dumps(material))

    def learn(self, tasks: Sequence[Task]) -> dict:
        stage = len(tasks) - 1
        signature = self._signature(tasks)
        meta = self.store.find(stage, signature)
        if meta is not None:
            if self.signature != signature:
                _ = self.base
                self.restore(self.store.load(stage), len(tasks))
                self.tasks, self.signature = [t.name for t in tasks], signature
            return {**meta["metrics"], "cached": True}
        if stage > 0 and self.signature != self._signature(tasks[:-1]):
            self.learn(tasks[:-1])
        elif stage == 0:
            _ = self.base
            self.reset()  # also discards what an interrupted first stage left behind
        self.signature = None  # the state in memory is in flux until the stage is saved
        metrics = self.train_task(tasks[-1], stage)
        self.tasks = [t.name for t in tasks]
        metrics["trainable_parameters"] = self.trainable_parameters()
        self.store.save(stage, self.snapshot(), {"signature": signature, "metrics": metrics})
        self.signature = signature
        return {**metrics, "cached": False}

    def _routes(self, prompts: list[list[int]]) -> list[Route]:
        if not self.tasks:
            return [Route(BASE, "no_experts") for _ in prompts]
        return [Route(self.tasks[k], self.route_reason) for k in self.choose(self.features(prompts))]

    def routes(self, queries: Sequence[str]) -> list[Route]:
        return self._routes([self.formatter.prompt_ids(q) for q in queries])

    def answer(self, queries: Sequence[str], budgets: Sequence[int], task: str | None = None) -> list[Answer]:
        """Greedy answers, routed by task inference, or all by `task` when a task id is given."""
        fmt = self.formatter
        prompts = [fmt.prompt_ids(q) for q in queries]
        routes = self._routes(prompts) if task is None else [Route(task, "task_id") for _ in prompts]
        texts = [""] * len(queries)
        for name in dict.fromkeys(r.answered_by for r in routes):
            members = [i for i, r in enumerate(routes) if r.answered_by == name]
            self.activate(None if name == BASE else self.tasks.index(name))
            outputs = greedy_generate(
                self.model,
                [prompts[i] for i in members],
                [budgets[i] for i in members],
                fmt.eos_id,
                self.base.tokenizer.pad_token_id,
                self.config.generate.batch_size,
            )
            for i, out in zip(members, outputs):
                texts[i] = fmt.decode(out)
        self.activate(None)
        return [Answer(q, t, r) for q, t, r in zip(queries, texts, routes)]

    def close(self) -> None:
        self._base, self.layers, self.tasks, self.signature = None, {}, [], None
