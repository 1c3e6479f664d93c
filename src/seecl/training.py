"""The supervised fine-tuning loop shared by every method.

Owns batch planning (class-mixed, length-grouped batches), gradient accumulation to a global batch, the schedule,
clipping, step checkpoints, and multi-device execution through accelerate (`accelerate launch
seecl ...` runs the same code on several GPUs; a CPU run is the one-process case).
It does not know about SEE, experts or stores: it trains whatever parameters require grad. The
loss of a micro-batch is loss.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from seecl.config import TrainConfig
from seecl.data.prompts import IGNORE, Example
from seecl.loss import TOKEN_ROWS, SupervisedLoss
from seecl.publish import publish_dir

MEGABATCH = 16  # batches whose members are regrouped by length together


# ----------------------------------------------------------------------------- batch planning


def _split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """Cut `items` into `parts` consecutive slices whose sizes differ by at most one."""
    return [items[(p * len(items)) // parts : ((p + 1) * len(items)) // parts] for p in range(parts)]


def plan_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, mode: str = "stratified"
) -> list[list[int]]:
    """Indices of each global batch for one epoch; deterministic in (seed, epoch).

    'stratified': negatives and positives are spread over the batches in proportion (batch sizes
    differ by at most one example per class), then regrouped by length inside groups of
    MEGABATCH batches, per class, so no batch becomes all-negative because negatives are longer.
    """
    rng = random.Random(f"{seed}:{epoch}")
    n = len(examples)
    n_batches = max(1, math.ceil(n / batch_size))
    length = [len(e) for e in examples]
    if mode == "random":
        order = list(range(n))
        rng.shuffle(order)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if mode == "length":
        order = list(range(n))
        rng.shuffle(order)
        chunk = batch_size * MEGABATCH
        grouped = []
        for i in range(0, n, chunk):
            grouped.extend(sorted(order[i : i + chunk], key=lambda j: -length[j]))
        batches = [grouped[i : i + batch_size] for i in range(0, n, batch_size)]
        rng.shuffle(batches)
        return batches
    if mode != "stratified":
        raise ValueError(f"unknown batching mode {mode!r}")
    classes = [[i for i, e in enumerate(examples) if e.positive], [i for i, e in enumerate(examples) if not e.positive]]
    per_class = []
    for members in classes:
        rng.shuffle(members)
        per_class.append(_split_evenly(members, n_batches))
    # Positives fill batches from the front and negatives from the back, so that when a class has
    # fewer members than there are batches, the two classes' remainders complement each other.
    per_class[1] = per_class[1][::-1]
    batches: list[list[int]] = []
    for start in range(0, n_batches, MEGABATCH):
        stop = min(start + MEGABATCH, n_batches)
        group: list[list[int]] = [[] for _ in range(start, stop)]
        for slices in per_class:
            sizes = [len(s) for s in slices[start:stop]]
            pooled = sorted((i for s in slices[start:stop] for i in s), key=lambda j: -length[j])
            offset = 0
            for b, size in enumerate(sizes):
                group[b].extend(pooled[offset : offset + size])
                offset += size
        batches.extend(group)
    rng.shuffle(batches)
    return [b for b in batches if b]


def micro_batches(batch: list[int], examples: list[Example], micro_size: int) -> list[list[int]]:
    """Split a global batch into micro-batches of similar length (less padding)."""
    ordered = sorted(batch, key=lambda i: -len(examples[i]))
    return [ordered[i : i + micro_size] for i in range(0, len(ordered), micro_size)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e.input_ids)
        labels[row, : len(e)] = torch.tensor(e.labels)
        mask[row, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- training loop


@dataclass
class TrainResult:
    steps: int
    epochs: int
    examples: int
    tokens: int  # non-padding tokens of the whole run (all epochs)
    supervised_tokens: int
    seconds: float  # wall time of this session (after a resume: since the resume)
    session_tokens: int  # non-padding tokens of the examples trained on in this session
    mean_loss: float  # per supervised token, averaged over optimizer steps
    final_loss: float  # per supervised token over the last epoch
    resumed_from_step: int = 0
    computed_tokens: int = 0  # token positions actually run this session (shared heads once)
    attention_pairs: int = 0  # causal (query, key) pairs actually computed this session
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.session_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_second"] = round(self.tokens_per_second, 2)
        return out


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_fingerprint(examples: list[Example], cfg: TrainConfig) -> str:
    """Identifies a training run (data and every setting that changes the result)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(repr((e.input_ids, e.labels, e.positive)).encode())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_every")}
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()


def _save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, losses, fingerprint: str) -> None:
    def write(staging: Path) -> None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
        save_file(trainable, str(staging / "trainable.safetensors"))
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "losses": losses,
            "fingerprint": fingerprint,
        }
        torch.save(state, staging / "state.pt")

    publish_dir(directory, write, replace=True)


def _load_checkpoint(directory: Path, model, optimizer, scheduler, fingerprint: str) -> tuple[int, list[float]]:
    """Restore a checkpoint of the same run; one of another run is discarded (start at step 0)."""
    # Optimizer/scheduler state only: plain tensors and numbers written by this module.
    state = torch.load(directory / "state.pt", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(directory, ignore_errors=True)
        return 0, []
    weights = load_file(str(directory / "trainable.safetensors"))
    params = _trainable(model)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), list(state["losses"])


class TrainingForbidden(RuntimeError):
    """Raised by `train` inside `forbid_training()`: something trained that should have been loaded."""


_forbidden = 0


@contextlib.contextmanager
def forbid_training():
    """Within this block every call of `train` raises: the one seam through which a resumed run,
    a cached stage or a re-scoring is shown to train nothing (every method trains through `train`)."""
    global _forbidden
    _forbidden += 1
    try:
        yield
    finally:
        _forbidden -= 1


def train(
    model: torch.nn.Module,
    examples: list[Example],
    cfg: TrainConfig,
    pad_id: int,
    checkpoint_dir: str | Path | None = None,
    desc: str = "train",
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad on `examples`; returns the metrics.

    `regularizer`, when given, returns a loss on the parameters themselves (e.g. SETA's elastic
    anchoring); it is added once per optimizer step and is not part of the reported loss.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if _forbidden:
        raise TrainingForbidden(f"{desc}: trained inside forbid_training()")
    if not examples:
        raise ValueError("no training examples")
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else cfg.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(
            f"train.batch_size {cfg.batch_size} is not divisible by micro_batch_size "
            f"x processes ({cfg.micro_batch_size} x {world})"
        )
    torch.manual_seed(cfg.seed)
    plans = [plan_batches(examples, cfg.batch_size, cfg.seed, epoch, cfg.batching) for epoch in range(cfg.epochs)]
    total_steps = sum(len(p) for p in plans)
    named = _trainable(model)
    params = list(named.values())
    if not params:
        raise ValueError("the model has no trainable parameters")
    rows = [p for n, p in named.items() if TOKEN_ROWS in n]
    groups = [{"params": [p for n, p in named.items() if TOKEN_ROWS not in n], "lr": cfg.lr}]
    if rows:
        groups.append({"params": rows, "lr": cfg.lr * cfg.indicator_lr_scale, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loss_module = SupervisedLoss(model, cfg.share_prefix_tokens)
    counter = loss_module
    # The scheduler stays unprepared: accelerate would step it once per process, but our steps
    # are already global (every process takes part in each one).
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    device = accelerator.device

    checkpoint = Path(checkpoint_dir) / "checkpoint" if checkpoint_dir else None
    fingerprint = run_fingerprint(examples, cfg)
    start_step, losses = 0, []
    if checkpoint is not None and (checkpoint / "state.pt").is_file():
        start_step, losses = _load_checkpoint(checkpoint, model, optimizer, scheduler, fingerprint)

    model.train()
    started = time.perf_counter()
    session_tokens = 0  # non-padding tokens this process computed since (re)starting
    step = 0
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=not cfg.progress or not accelerator.is_main_process,
    )
    for epoch, plan in enumerate(plans):
        for batch in plan:
            step += 1
            if step <= start_step:
                continue
            micros = micro_batches(batch, examples, cfg.micro_batch_size)
            batch_tokens = sum(examples[i].supervised for i in batch)
            # DDP averages gradients over processes: scale so the result is the global token mean.
            scale = world / max(batch_tokens, 1)
            mine = micros[rank::world]
            step_loss = torch.zeros((), device=device)
            for k, micro in enumerate(mine):
                tensors = {key: t.to(device) for key, t in collate([examples[i] for i in micro], pad_id).items()}
                sync = k == len(mine) - 1
                context = accelerator.no_sync(loss_module) if not sync else contextlib.nullcontext()
                with context, accelerator.autocast():
                    loss = loss_module(**tensors)
                    accelerator.backward(loss * scale)
                step_loss += loss.detach()
                session_tokens += int(tensors["attention_mask"].sum())
            if regularizer is not None:
                accelerator.backward(regularizer())
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = accelerator.reduce(step_loss, reduction="sum")
            value = float(step_loss) / max(batch_tokens, 1)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", epoch=f"{epoch + 1}/{cfg.epochs}")
            bar.update(1)
            if (
                checkpoint is not None
                and cfg.checkpoint_every
                and step % cfg.checkpoint_every == 0
                and step < total_steps
                and accelerator.is_main_process
            ):
                _save_checkpoint(checkpoint, step, model, optimizer, scheduler, losses, fingerprint)
    bar.close()
    model.eval()
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    session = accelerator.reduce(torch.tensor(session_tokens, device=device), reduction="sum")
    counts = accelerator.reduce(
        torch.tensor([counter.computed_tokens, counter.attention_pairs], device=device), reduction="sum"
    ).tolist()
    final = losses[-len(plans[-1]) :]
    return TrainResult(
        steps=total_steps,
        epochs=cfg.epochs,
        examples=len(examples),
        tokens=cfg.epochs * sum(len(e) for e in examples),
        supervised_tokens=cfg.epochs * sum(e.supervised for e in examples),
        seconds=time.perf_counter() - started,
        session_tokens=int(session),
        mean_loss=sum(losses) / len(losses),
        final_loss=sum(final) / len(final),
        resumed_from_step=start_step,
        computed_tokens=int(counts[0]),
        attention_pairs=int(counts[1]),
        losses=[round(x, 5) for x in losses],
    )
