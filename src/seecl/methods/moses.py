"""MoSEs, Mixtures of SubExperts (docs/design.md §2), and the layer-wrapping scaffolding SETA reuses.

This module owns (1) `LayerMethod`, the scaffolding shared with seta.py: plain-torch wrappers
injected around the base model's target nn.Linear layers, frozen-base query features, per-stage
snapshots (safetensors + json) that make `learn` idempotent, and answering by grouping queries by
the task they are routed to; and (2) MoSEs itself. SETA's own parts live in seta.py; the training
loop is seecl.training.train (it trains whatever requires grad).

MoSEs publishes no code. Following the paper's text: every adapted layer holds a pool of LoRA
sub-experts; each task learns binary masks over the sub-experts' weights, the top-c% of learned
scores with straight-through gradients, and a task-specific router that mixes the top-k
sub-experts; weights claimed by an earlier task's mask are frozen but may be reused by later masks;
a new sub-expert joins the pool only when free capacity runs low, so parameters grow sublinearly;
inference needs a task id, and task inference by nearest prototype of frozen-base embeddings
serves the task-agnostic setting.

Our reading, where the text leaves choices open:
- sub-experts have rank `adapter.r`, scaling alpha/r, LoRA init (A uniform, B zero), dropout on
  the expert path; the pool starts with `experts` sub-experts in every target layer;
- a mask keeps the top `capacity` share of one score tensor spanning all sub-experts of a layer's
  A (and one for B); scores start U(0, 1); a weight is claimed by the task's *final* mask;
- "frozen" is exact: claimed values live in a buffer the optimizer never sees, so their gradient
  is zero and old tasks stay bit-identical whatever the optimizer (a fresh AdamW per task);
- the router is per task and per layer, token-level: softmax over a linear map of the layer input,
  the top-k probabilities kept without renormalising (so the router gets gradients even at k=1),
  initialised N(0, 0.02^2); all pool sub-experts are computed densely and gated (fine for a
  handful of sub-experts);
- growth: before each task, when the free share of pool weights (over all layers) is below
  `grow_below`, one sub-expert is added to every layer;
- task inference: mean-pooled last hidden state of the frozen base (adapters bypassed) over the
  prompt tokens; a task's prototype is the mean over up to `feature_queries` of its training
  queries; a query goes to the task with the nearest prototype (Euclidean). No query is left to
  the base model (no OOD rejection), so RB-Acc is 0 by construction;
- `trainable_parameters` counts the kept real-valued parameters (pool and routers); masks are kept
  as bits (`mask_bits` in the stage metrics) and the scores are dropped after their task.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seecl.data.task import Task
from seecl.methods.base import MethodContext
from seecl.methods.layers import LayerMethod, generator

# ----------------------------------------------------------------------------- shared scaffolding


# ----------------------------------------------------------------------------- MoSEs


def needs_new_expert(free_fraction: float, grow_below: float) -> bool:
    """The growth rule: add a sub-expert only when the free share of pool weights is below the threshold."""
    return free_fraction < grow_below


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the largest `fraction` of `scores` (at least one entry)."""
    k = max(1, round(fraction * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.detach().flatten().topk(k).indices] = True
    return flat.view_as(scores)


def straight_through(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The hard top-fraction mask forward; identity gradient to the scores backward."""
    hard = top_fraction(scores, fraction).to(scores.dtype)
    return hard + (scores - scores.detach())  # (s - s) is exactly 0: the forward value is the hard mask


class SubExpertLinear(nn.Module):
    """A frozen nn.Linear plus a pool of LoRA sub-experts, masked and routed per task."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, top_k: int):
        super().__init__()
        self.base, self.r, self.scaling, self.top_k = base, r, alpha / r, top_k
        self.dropout = nn.Dropout(dropout)
        self.bypass = False
        self.clear()

    def clear(self) -> None:
        w = self.base.weight
        out_f, in_f = w.shape
        self.A = nn.Parameter(w.new_zeros(0, self.r, in_f), requires_grad=False)
        self.B = nn.Parameter(w.new_zeros(0, out_f, self.r), requires_grad=False)
        # Claimed values are read from these buffers, never from the trainable pool.
        self.register_buffer("frozen_A", w.new_zeros(0, self.r, in_f))
        self.register_buffer("frozen_B", w.new_zeros(0, out_f, self.r))
        self.register_buffer("claimed_A", torch.zeros(0, self.r, in_f, dtype=torch.bool, device=w.device))
        self.register_buffer("claimed_B", torch.zeros(0, out_f, self.r, dtype=torch.bool, device=w.device))
        self.learning = nn.ParameterDict()  # the current task's mask scores and router while it trains
        self.capacity = 1.0
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.routers: list[torch.Tensor] = []
        self.active: int | None = None
        self._effective: tuple | None = None

    @property
    def pool_size(self) -> int:
        return self.A.shape[0]

    def grow(self, gen: torch.Generator) -> None:
        w = self.base.weight
        out_f, in_f = w.shape
        bound = 1 / math.sqrt(in_f)  # PEFT's LoRA init (kaiming uniform, a=sqrt(5))
        new_a = ((torch.rand(1, self.r, in_f, generator=gen) * 2 - 1) * bound).to(w)
        self.A = nn.Parameter(torch.cat([self.A.detach(), new_a]), requires_grad=False)
        self.B = nn.Parameter(torch.cat([self.B.detach(), w.new_zeros(1, out_f, self.r)]), requires_grad=False)
        self.frozen_A = torch.cat([self.frozen_A, torch.zeros_like(new_a)])
        self.frozen_B = torch.cat([self.frozen_B, w.new_zeros(1, out_f, self.r)])
        self.claimed_A = torch.cat([self.claimed_A, torch.zeros_like(new_a, dtype=torch.bool)])
        self.claimed_B = torch.cat([self.claimed_B, torch.zeros(1, out_f, self.r, dtype=torch.bool, device=w.device)])

    def begin_task(self, gen: torch.Generator, capacity: float) -> None:
        w = self.base.weight
        self.capacity = capacity
        self.learning = nn.ParameterDict(
            {
                "scores_A": nn.Parameter(torch.rand(self.A.shape, generator=gen).to(w)),
                "scores_B": nn.Parameter(torch.rand(self.B.shape, generator=gen).to(w)),
                "router": nn.Parameter((torch.randn(self.pool_size, w.shape[1], generator=gen) * 0.02).to(w)),
            }
        )
        self.A.requires_grad_(True)
        self.B.requires_grad_(True)

    def end_task(self) -> int:
        """Fix the task's hard masks, claim (freeze) the weights they select; returns new claims."""
        mask_a = top_fraction(self.learning["scores_A"], self.capacity)
        mask_b = top_fraction(self.learning["scores_B"], self.capacity)
        new_a, new_b = mask_a & ~self.claimed_A, mask_b & ~self.claimed_B
        self.frozen_A = torch.where(new_a, self.A.detach(), self.frozen_A)
        self.frozen_B = torch.where(new_b, self.B.detach(), self.frozen_B)
        self.claimed_A, self.claimed_B = self.claimed_A | mask_a, self.claimed_B | mask_b
        self.A = nn.Parameter(torch.where(self.claimed_A, self.frozen_A, self.A.detach()), requires_grad=False)
        self.B = nn.Parameter(torch.where(self.claimed_B, self.frozen_B, self.B.detach()), requires_grad=False)
        self.masks.append((mask_a, mask_b))
        self.routers.append(self.learning["router"].detach().clone())
        self.learning = nn.ParameterDict()
        self._effective = None
        return int(new_a.sum() + new_b.sum())

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(self.learning):
            a = torch.where(self.claimed_A, self.frozen_A, self.A) * straight_through(
                self.learning["scores_A"], self.capacity
            )
            b = torch.where(self.claimed_B, self.frozen_B, self.B) * straight_through(
                self.learning["scores_B"], self.capacity
            )
            return a, b, self.learning["router"]
        if self._effective is None or self._effective[0] != self.active:
            mask_a, mask_b = self.masks[self.active]
            n = mask_a.shape[0]  # the pool as it was when the task learned
            self._effective = (
                self.active,
                torch.where(mask_a, self.frozen_A[:n], 0.0),
                torch.where(mask_b, self.frozen_B[:n], 0.0),
                self.routers[self.active],
            )
        return self._effective[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.bypass or (not len(self.learning) and self.active is None):
            return out
        a, b, router = self._weights()
        h = torch.einsum("...i,eri->...er", self.dropout(x), a)
        y = torch.einsum("...er,eor->...eo", h, b)
        probs = torch.softmax(nn.functional.linear(x, router), dim=-1)
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        return out + self.scaling * torch.einsum("...e,...eo->...o", gates, y)


class MoSEs(LayerMethod):
    def __init__(self, ctx: MethodContext, label: str = "MoSEs"):
        super().__init__(ctx, label)
        settings = ctx.config.moses  # validated by MosesConfig
        self.initial, self.capacity, self.top_k = settings.experts, settings.capacity, settings.top_k
        self.grow_below, self.feature_queries = settings.grow_below, settings.feature_queries
        self.prototypes: list[torch.Tensor] = []

    def settings(self) -> dict:
        return {
            "experts": self.initial,
            "capacity": self.capacity,
            "top_k": self.top_k,
            "grow_below": self.grow_below,
            "feature_queries": self.feature_queries,
        }

    def make_layer(self, linear: nn.Linear) -> SubExpertLinear:
        a = self.config.adapter
        return SubExpertLinear(linear, a.r, a.alpha, a.dropout, self.top_k)

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.clear()
        for _ in range(self.initial):
            self.grow()
        self.prototypes, self.tasks, self.signature = [], [], None

    def grow(self) -> None:
        seed = self.config.train.seed
        for name, layer in self.layers.items():
            layer.grow(generator("moses-expert", seed, name, layer.pool_size))

    @property
    def pool_size(self) -> int:
        return next(iter(self.layers.values())).pool_size

    def free_fraction(self) -> float:
        total = sum(l.claimed_A.numel() + l.claimed_B.numel() for l in self.layers.values())
        claimed = sum(int(l.claimed_A.sum() + l.claimed_B.sum()) for l in self.layers.values())
        return 1.0 - claimed / total

    def train_task(self, task: Task, stage: int) -> dict:
        free = self.free_fraction()
        grew = needs_new_expert(free, self.grow_below)
        if grew:
            self.grow()
        seed = self.config.train.seed
        for name, layer in self.layers.items():
            layer.begin_task(generator("moses-scores", seed, stage, task.name, name), self.capacity)
        self.activate(None)
        metrics = self.fit(self.examples(task), stage)
        claims = sum(layer.end_task() for layer in self.layers.values())
        self.prototypes.append(self.task_features(task, self.feature_queries).mean(0))
        bits = sum(m.numel() for l in self.layers.values() for pair in l.masks for m in pair)
        return {
            **metrics,
            "free_fraction_before": free,
            "grew": grew,
            "experts": self.pool_size,
            "new_claims": claims,
            "free_fraction": self.free_fraction(),
            "mask_bits": bits,
        }

    def activate(self, task: int | None) -> None:
        for layer in self.layers.values():
            layer.active = task

    def choose(self, features: torch.Tensor) -> list[int]:
        return torch.cdist(features, torch.stack(self.prototypes)).argmin(1).tolist()

    def trainable_parameters(self) -> int:
        return sum(l.A.numel() + l.B.numel() + sum(r.numel() for r in l.routers) for l in self.layers.values())

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"prototype.{k}": p for k, p in enumerate(self.prototypes)}
        for name, l in self.layers.items():
            out.update(
                {f"{name}.A": l.A, f"{name}.B": l.B, f"{name}.claimed_A": l.claimed_A, f"{name}.claimed_B": l.claimed_B}
            )
            for k, ((mask_a, mask_b), router) in enumerate(zip(l.masks, l.routers)):
                out.update({f"{name}.mask_A.{k}": mask_a, f"{name}.mask_B.{k}": mask_b, f"{name}.router.{k}": router})
        return out

    def restore(self, tensors: dict[str, torch.Tensor], n_tasks: int) -> None:
        device = self.base.device
        t = {k: v.to(device) for k, v in tensors.items()}
        for name, l in self.layers.items():
            l.clear()
            l.A = nn.Parameter(t[f"{name}.A"], requires_grad=False)
            l.B = nn.Parameter(t[f"{name}.B"], requires_grad=False)
            l.claimed_A, l.claimed_B = t[f"{name}.claimed_A"], t[f"{name}.claimed_B"]
            l.frozen_A = torch.where(l.claimed_A, l.A.detach(), 0.0)
            l.frozen_B = torch.where(l.claimed_B, l.B.detach(), 0.0)
            l.masks = [(t[f"{name}.mask_A.{k}"], t[f"{name}.mask_B.{k}"]) for k in range(n_tasks)]
            l.routers = [t[f"{name}.router.{k}"] for k in range(n_tasks)]
        self.prototypes = [tensors[f"prototype.{k}"] for k in range(n_tasks)]
