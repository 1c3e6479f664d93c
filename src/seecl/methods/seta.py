"""SETA: a shared expert plus one unique sparse expert per task, chosen by a gate (docs/design.md §2).

This module owns SETA's sparse delta layers, subspace selection, elastic anchoring, the gate and
its routing-aware regularisation, and SETA's snapshots. Layer wrapping, frozen-base features,
stage persistence and grouped answering come from moses.py (`LayerMethod`); the training loop is
seecl.training.train, with its `regularizer` hook carrying the anchoring penalty.

SETA publishes no code. Following the paper's text: each task gets a sparse subspace of the
adapted weights chosen by gradient sensitivity; the part of it shared with earlier tasks'
subspaces belongs to a shared expert protected by Fisher-weighted elastic anchoring
(sum_i F_i (theta_i - theta*_i)^2 with a diagonal Fisher from squared gradients); the rest is the
task's unique expert, frozen after the task; a gating network on frozen-base features picks the
unique expert without a task id; routing-aware regularisation keeps the gate's outputs for old
tasks stable (KL against its stored outputs on stored pseudo-features).

Our reading, where the text leaves choices open:
- experts are sparse additive deltas on the target layers' dense weights (q_proj, v_proj by
  default); a task's subspace has density * r * (in + out) entries per layer, the parameter count
  of a rank-r LoRA there, chosen as the largest |dL/dW| summed over `probe` training examples
  (per-example gradients, at the base plus the shared expert); alpha does not apply;
- subspace entries already owned by an earlier unique expert join the shared expert (a separate
  delta, initially 0, always applied); the others form the new unique expert, which starts at 0;
- the Fisher of a task is the mean of per-example squared gradients over the same probe examples
  at the trained state, on the task's whole subspace, normalised to mean 1 there; the importances
  of all tasks are summed; the anchor is the shared expert after the previous task; the penalty
  ewc_lambda/2 * sum F (h - h*)^2 is added once per optimizer step;
- "frozen" is exact: a finished unique expert is stored apart from any trainable tensor;
- the gate is a linear softmax classifier on mean-pooled frozen-base hidden states (centred and
  scaled by the first task's features), with one new output per task. At stage t it is fitted on
  the new task's real features plus pseudo-features of every old task (feature mean + per-dimension
  std * Gaussian noise, from stored statistics), with cross-entropy plus kl_weight * KL(stored old
  outputs || new outputs renormalised over the old tasks) on the pseudo-features stored at t-1;
- inference picks the single most probable unique expert (top-1; the route names its task) and
  applies it with the shared expert; no query is left to the base model, so RB-Acc is 0;
- `trainable_parameters` counts the unique entries of all tasks, the shared entries and the gate.
"""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F
from torch import nn

from seecl import training
from seecl.data.task import Task
from seecl.loss import SupervisedLoss
from seecl.methods.base import MethodContext
from seecl.methods.layers import LayerMethod, generator


def anchor_penalty(value: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """Elastic anchoring: 1/2 * sum F (theta - theta*)^2 (F is zero off the anchored entries)."""
    return 0.5 * (fisher * (value - anchor) ** 2).sum()


def top_count(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(min(k, scores.numel())).indices] = True
    return flat.view_as(scores)


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear plus a masked unique delta and a masked shared delta on its weight."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.bypass = False
        self.probe: torch.Tensor | None = None  # a zero delta whose gradient is dL/dW (sensitivity, Fisher)
        self.clear()

    def clear(self) -> None:
        w = self.base.weight
        self.unique = nn.Parameter(torch.zeros_like(w), requires_grad=False)
        self.shared = nn.Parameter(torch.zeros_like(w), requires_grad=False)
        self.register_buffer("unique_mask", torch.zeros_like(w, dtype=torch.bool))
        self.register_buffer("shared_mask", torch.zeros_like(w, dtype=torch.bool))
        self._merged: torch.Tensor | None = None

    def invalidate(self) -> None:
        self._merged = None

    def weight(self) -> torch.Tensor:
        w = (
            self.base.weight
            + torch.where(self.unique_mask, self.unique, 0.0)
            + torch.where(self.shared_mask, self.shared, 0.0)
        )
        return w if self.probe is None else w + self.probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base(x)
        live = self.training or self.probe is not None or self.unique.requires_grad or self.shared.requires_grad
        if live:
            return F.linear(x, self.weight(), self.base.bias)
        if self._merged is None:  # inference: merge once per expert switch, not per decoding step
            self._merged = self.weight().detach()
        return F.linear(x, self._merged, self.base.bias)


@contextlib.contextmanager
def one_thread():
    """The gate's problems are tiny: on a busy CPU, waiting for a second intra-op thread in every
    small op costs far more than the work (measured: 300 steps took 35 s on 2 threads, 2 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Gate:
    """Linear softmax classifier over normalised frozen-base features, one output per task."""

    def __init__(self):
        self.center: torch.Tensor | None = None
        self.scale = torch.ones(())
        self.weight = torch.zeros(0, 0)
        self.bias = torch.zeros(0)
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []
        self.pseudo: torch.Tensor | None = None  # stored pseudo-features of the tasks so far
        self.outputs: torch.Tensor | None = None  # the gate's probabilities on them, when stored

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.center) / self.scale

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.t() + self.bias

    def sample(self, task: int, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.means[task] + self.stds[task] * torch.randn(n, self.means[task].numel(), generator=gen)

    def fit(
        self, features: torch.Tensor, stage: int, *, seed: int, steps: int, lr: float, kl_weight: float, n_pseudo: int
    ) -> dict:
        """Add task `stage` from its real features; old tasks come from pseudo-features only."""
        if self.center is None:
            self.center = features.mean(0)
            spread = ((features - self.center) ** 2).mean().sqrt()
            self.scale = spread if spread > 0 else torch.ones(())
        z = self.normalize(features)
        self.means.append(z.mean(0))
        self.stds.append(z.std(0, unbiased=False))
        d = z.shape[1]
        weight = torch.cat([self.weight.reshape(stage, d), torch.zeros(1, d)]).requires_grad_(True)
        bias = torch.cat([self.bias, torch.zeros(1)]).requires_grad_(True)
        loss_value = 0.0
        if stage > 0:
            xs = [z] + [self.sample(j, n_pseudo, generator("seta-gate", seed, stage, j)) for j in range(stage)]
            ys = torch.cat([torch.full((len(x),), j, dtype=torch.long) for j, x in zip([stage, *range(stage)], xs)])
            x = torch.cat(xs)
            optimizer = torch.optim.Adam([weight, bias], lr=lr)
            with one_thread():
                for _ in range(steps):
                    optimizer.zero_grad()
                    loss = F.cross_entropy(x @ weight.t() + bias, ys)
                    if kl_weight > 0 and self.pseudo is not None:
                        old = torch.log_softmax((self.pseudo @ weight.t() + bias)[:, :stage], dim=-1)
                        loss = loss + kl_weight * F.kl_div(old, self.outputs, reduction="batchmean")
                    loss.backward()
                    optimizer.step()
            loss_value = float(loss.detach())
        self.weight, self.bias = weight.detach(), bias.detach()
        self.pseudo = torch.cat(
            [self.sample(j, n_pseudo, generator("seta-store", seed, stage, j)) for j in range(stage + 1)]
        )
        self.outputs = torch.softmax(self.logits(self.pseudo), dim=-1)
        return {"gate_loss": loss_value}

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "gate.center": self.center,
            "gate.scale": self.scale,
            "gate.weight": self.weight,
            "gate.bias": self.bias,
            "gate.means": torch.stack(self.means),
            "gate.stds": torch.stack(self.stds),
            "gate.pseudo": self.pseudo,
            "gate.outputs": self.outputs,
        }

    def load(self, t: dict[str, torch.Tensor]) -> None:
        self.center, self.scale, self.weight, self.bias = (
            t["gate.center"],
            t["gate.scale"],
            t["gate.weight"],
            t["gate.bias"],
        )
        self.means, self.stds = list(t["gate.means"]), list(t["gate.stds"])
        self.pseudo, self.outputs = t["gate.pseudo"], t["gate.outputs"]


class SETA(LayerMethod):
    route_reason = "gate"

    def __init__(self, ctx: MethodContext, label: str = "SETA"):
        super().__init__(ctx, label)
        s = ctx.config.seta  # validated by SetaConfig
        self.density, self.probe, self.ewc_lambda = s.density, s.probe, s.ewc_lambda
        self.gate_steps, self.gate_lr, self.kl_weight = s.gate_steps, s.gate_lr, s.kl_weight
        self.pseudo, self.feature_queries = s.pseudo, s.feature_queries
        self.uniques: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.gate = Gate()

    def settings(self) -> dict:
        return {
            "density": self.density,
            "probe": self.probe,
            "ewc_lambda": self.ewc_lambda,
            "gate_steps": self.gate_steps,
            "gate_lr": self.gate_lr,
            "kl_weight": self.kl_weight,
            "pseudo": self.pseudo,
            "feature_queries": self.feature_queries,
        }

    def make_layer(self, linear: nn.Linear) -> SparseDeltaLinear:
        return SparseDeltaLinear(linear)

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.clear()
        self.uniques = []  # uniques[k][layer] = (flat indices, values) of task k's unique expert
        self.claimed = {n: torch.zeros_like(l.unique_mask) for n, l in self.layers.items()}
        self.fisher = {n: torch.zeros_like(l.unique) for n, l in self.layers.items()}
        self.gate = Gate()
        self.tasks, self.signature = [], None

    def budget(self, layer: SparseDeltaLinear) -> int:
        out_f, in_f = layer.base.weight.shape
        return max(1, round(self.density * self.config.adapter.r * (in_f + out_f)))

    def activate(self, task: int | None) -> None:
        """Apply task `task`'s unique expert (None: only the shared one) in every layer."""
        for name, layer in self.layers.items():
            layer.unique_mask.zero_()
            with torch.no_grad():
                layer.unique.zero_()
                if task is not None:
                    idx, values = self.uniques[task][name]
                    layer.unique_mask.view(-1)[idx] = True
                    layer.unique.view(-1)[idx] = values
            layer.invalidate()

    def probe_gradients(self, examples, square: bool) -> dict[str, torch.Tensor]:
        """Sum of per-example |dL/dW| (or mean of (dL/dW)^2) over `examples`, L the mean token loss."""
        names = list(self.layers)
        sums = {n: torch.zeros_like(self.layers[n].base.weight) for n in names}
        loss_fn = SupervisedLoss(self.model)
        pad, device = self.base.tokenizer.pad_token_id, self.base.device
        self.model.eval()
        try:
            for layer in self.layers.values():
                layer.probe = torch.zeros_like(layer.base.weight, requires_grad=True)
            for example in examples:
                batch = {k: v.to(device) for k, v in training.collate([example], pad).items()}
                loss = loss_fn(**batch) / max(example.supervised, 1)
                grads = torch.autograd.grad(loss, [self.layers[n].probe for n in names])
                for n, g in zip(names, grads):
                    sums[n] += g**2 if square else g.abs()
        finally:
            for layer in self.layers.values():
                layer.probe = None
                layer.invalidate()
        return {n: s / len(examples) for n, s in sums.items()} if square else sums

    def penalty(self, anchors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.ewc_lambda * sum(anchor_penalty(self.layers[n].shared, anchors[n], weights[n]) for n in anchors)

    def train_task(self, task: Task, stage: int) -> dict:
        examples = self.examples(task)
        rng = random.Random(f"seta-probe:{self.config.train.seed}:{task.name}")
        probe = rng.sample(examples, min(self.probe, len(examples)))
        self.activate(None)
        sensitivity = self.probe_gradients(probe, square=False)
        subspace, unique_n, shared_new = {}, 0, 0
        for name, layer in self.layers.items():
            chosen = top_count(sensitivity[name], self.budget(layer))
            overlap = chosen & self.claimed[name]
            layer.shared_mask |= overlap
            layer.unique_mask.copy_(chosen & ~self.claimed[name])
            layer.unique.requires_grad_(True)
            layer.shared.requires_grad_(bool(layer.shared_mask.any()))
            subspace[name] = chosen
            unique_n += int(layer.unique_mask.sum())
            shared_new += int(overlap.sum())
        anchors = {n: l.shared.detach().clone() for n, l in self.layers.items() if l.shared.requires_grad}
        weights = {n: torch.where(self.layers[n].shared_mask, self.fisher[n], 0.0) for n in anchors}
        regularizer = (lambda: self.penalty(anchors, weights)) if anchors and self.ewc_lambda > 0 else None
        try:
            metrics = self.fit(examples, stage, regularizer)
        finally:
            for layer in self.layers.values():
                layer.unique.requires_grad_(False)
                layer.shared.requires_grad_(False)
                layer.invalidate()
        expert = {}
        for name, layer in self.layers.items():
            idx = layer.unique_mask.flatten().nonzero().squeeze(1)
            expert[name] = (idx, layer.unique.detach().flatten()[idx].clone())
            self.claimed[name] |= layer.unique_mask
        self.uniques.append(expert)
        fisher = self.probe_gradients(probe, square=True)  # the new unique expert is still applied
        mass = sum(float(fisher[n][subspace[n]].sum()) for n in fisher)
        count = sum(int(subspace[n].sum()) for n in fisher)
        norm = mass / count if mass > 0 else 1.0
        for n in fisher:
            self.fisher[n] += torch.where(subspace[n], fisher[n] / norm, 0.0)
        self.activate(None)
        gate = self.gate.fit(
            self.task_features(task, self.feature_queries),
            stage,
            seed=self.config.train.seed,
            steps=self.gate_steps,
            lr=self.gate_lr,
            kl_weight=self.kl_weight,
            n_pseudo=self.pseudo,
        )
        shared = sum(int(l.shared_mask.sum()) for l in self.layers.values())
        return {
            **metrics,
            **gate,
            "unique_entries": unique_n,
            "new_shared_entries": shared_new,
            "shared_entries": shared,
        }

    def choose(self, features: torch.Tensor) -> list[int]:
        return self.gate.logits(self.gate.normalize(features)).argmax(1).tolist()

    def trainable_parameters(self) -> int:
        unique = sum(int(v.numel()) for expert in self.uniques for _, v in expert.values())
        shared = sum(int(l.shared_mask.sum()) for l in self.layers.values())
        return unique + shared + self.gate.weight.numel() + self.gate.bias.numel()

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = self.gate.state()
        for name, layer in self.layers.items():
            shared_idx = layer.shared_mask.flatten().nonzero().squeeze(1)
            claimed_idx = self.claimed[name].flatten().nonzero().squeeze(1)
            out.update(
                {
                    f"{name}.shared.idx": shared_idx,
                    f"{name}.shared.val": layer.shared.detach().flatten()[shared_idx],
                    f"{name}.claimed.idx": claimed_idx,
                    f"{name}.fisher.val": self.fisher[name].flatten()[claimed_idx],
                }
            )
            for k, expert in enumerate(self.uniques):
                out[f"{name}.unique.{k}.idx"], out[f"{name}.unique.{k}.val"] = expert[name]
        return out

    def restore(self, tensors: dict[str, torch.Tensor], n_tasks: int) -> None:
        self.reset()
        device = self.base.device
        t = {k: v.to(device) for k, v in tensors.items()}
        for name, layer in self.layers.items():
            with torch.no_grad():
                layer.shared_mask.view(-1)[t[f"{name}.shared.idx"]] = True
                layer.shared.view(-1)[t[f"{name}.shared.idx"]] = t[f"{name}.shared.val"]
                self.claimed[name].view(-1)[t[f"{name}.claimed.idx"]] = True
                self.fisher[name].view(-1)[t[f"{name}.claimed.idx"]] = t[f"{name}.fisher.val"]
            layer.invalidate()
        self.uniques = [
            {n: (t[f"{n}.unique.{k}.idx"], t[f"{n}.unique.{k}.val"]) for n in self.layers} for k in range(n_tasks)
        ]
        self.gate.load(tensors)
