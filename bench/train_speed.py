"""Training speed: the seecl trainer against the standard transformers Trainer recipe.

Same data (the SEE reconstruction of SuperNI `qa` after `qg` and `sa`: qa positives plus
tau=10% negatives of each earlier task, 200 examples), same model, LoRA config, optimizer groups,
schedule, batch size and epochs, in one run:

- `hf`: transformers Trainer + PEFT + DataCollatorForSeq2Seq (random order, padding to the
  longest in each batch, loss through the model's full logits);
- `seecl_unshared`: seecl.training.train with prefix sharing off (class-mixed length-grouped
  batches, logits only at supervised positions);
- `seecl`: the same with its default prefix sharing (rows of a micro-batch that share a task
  definition run it once, gradients flowing through its KV cache).

Reports useful tokens/s (non-padding tokens of the examples trained on, per second) and the ratio
to the Trainer, the final training loss of each (per supervised token, measured after training on
all examples with the same loss function) and the relative difference, and two utilisations
against an fp32 GEMM ceiling measured in the same run:

- `mfu`, model FLOPs utilisation as PaLM defines it (Chowdhery et al. 2022, app. B): the FLOPs
  the training examples require (every useful token through the model, whatever the trainer
  skips) times the observed throughput, over the ceiling. Work a trainer avoids (padding it never
  computes, a shared task definition run once per micro-batch) raises it; recomputation does not.
- `hfu`, hardware FLOPs utilisation: the FLOPs of the work the trainer actually executed per
  second, over the ceiling. Shared heads are counted once, so prefix sharing lowers it.

Both count the forward and input-gradient passes through every linear layer (the base is frozen:
no weight gradients), causal attention pairs, the LoRA matmuls (forward, input and weight
gradients) and the output head at supervised positions.

    python bench/train_speed.py            # ~15 min on 2 CPU cores; writes results/bench/train_speed.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile

from common import DATA, RESULTS, gemm_ceiling, machine, print_table, timed, write_json


def build_examples(formatter, n_positives: int, tau: float):
    from seecl.data.formats import load_task
    from seecl.see.reconstruction import build_memory, reconstruct

    superni = DATA / "superni"
    earlier = [load_task(superni / f"{name}.train.jsonl", limit=100) for name in ("qg", "sa")]
    memories = [build_memory(task, 0.2, seed=0) for task in earlier]
    qa = load_task(superni / "qa.train.jsonl", limit=n_positives)
    return reconstruct(qa, memories, tau, seed=0).examples(formatter)


def flops_computed(config, adapter, vocab: int, tokens: int, attention_pairs: int, supervised: int) -> float:
    """FLOPs of the work the seecl trainer actually did (see module docstring)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    inner = config.intermediate_size
    linear = layers * (d * d + 2 * d * kv + d * d + 3 * d * inner)  # q, k, v, o, gate/up/down
    out_dims = {"q_proj": d, "k_proj": kv, "v_proj": kv, "o_proj": d}
    lora = layers * sum(adapter.r * (d + out_dims.get(t, d)) for t in adapter.targets)
    return (
        2 * 2 * linear * tokens  # forward + input gradient
        + 3 * 2 * lora * tokens  # forward + input gradient + weight gradient
        + 3 * 2 * 2 * layers * d * attention_pairs  # QK^T and AV per causal pair, forward + 2x backward
        + 2 * 2 * d * vocab * supervised
    )  # output head at supervised positions


def model_flops(config, adapter, vocab: int, examples, epochs: int) -> float:
    """FLOPs the examples require: every token of every example, full causal attention."""
    tokens = sum(len(e) for e in examples)
    pairs = sum(len(e) * (len(e) + 1) // 2 for e in examples)
    supervised = sum(e.supervised for e in examples)
    return epochs * flops_computed(config, adapter, vocab, tokens, pairs, supervised)


def fresh_model(base_model, adapter_cfg, indicators):
    from seecl.adapters import add_expert

    return add_expert(copy.deepcopy(base_model), "bench", adapter_cfg, indicators, seed=0)


def optimizer_and_schedule(model, cfg, steps):
    import torch
    from transformers import get_scheduler

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [p for n, p in named.items() if "trainable_tokens_delta" in n]
    groups = [
        {"params": [p for n, p in named.items() if "trainable_tokens_delta" not in n], "lr": cfg.lr},
        {"params": rows, "lr": cfg.lr * cfg.indicator_lr_scale, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, get_scheduler(cfg.schedule, optimizer, num_warmup_steps=0, num_training_steps=steps)


def run_hf_trainer(model, examples, cfg, tokenizer) -> dict:
    import math

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    rows = [
        {"input_ids": list(e.input_ids), "attention_mask": [1] * len(e), "labels": list(e.labels)} for e in examples
    ]
    steps = cfg.epochs * math.ceil(len(rows) / cfg.batch_size)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
            num_train_epochs=cfg.epochs,
            max_grad_norm=cfg.max_grad_norm,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            use_cpu=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
            optimizers=optimizer_and_schedule(model, cfg, steps),
        )
        output, seconds = timed(trainer.train)
    return {"seconds": seconds, "train_loss": output.training_loss}


def run_seecl(model, examples, cfg, pad_id) -> dict:
    from seecl.training import train

    result = train(model, examples, cfg, pad_id, desc="seecl trainer")
    return {
        "seconds": result.seconds,
        "train_loss": result.mean_loss,
        "computed_tokens": result.computed_tokens,
        "attention_pairs": result.attention_pairs,
        "supervised_tokens": result.supervised_tokens,
    }


def final_loss(model, examples, pad_id) -> float:
    """Mean loss per supervised token over all examples, eval mode, same function for both."""
    import torch

    from seecl.training import SupervisedLoss, collate

    model.eval()
    loss_fn = SupervisedLoss(model)
    total = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = examples[i : i + 8]
            total += float(loss_fn(**collate(batch, pad_id)))
            tokens += sum(e.supervised for e in batch)
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--positives", type=int, default=180, help="qa instances (negatives come on top)")
    parser.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    args = parser.parse_args()

    from seecl.config import AdapterConfig, ModelConfig, TrainConfig
    from seecl.data.prompts import PromptFormatter
    from seecl.model.base import load_base

    base = load_base(ModelConfig())
    formatter = PromptFormatter(base.tokenizer, base.indicators)
    examples = build_examples(formatter, args.positives, 0.1)
    adapter = AdapterConfig()
    cfg = TrainConfig(epochs=args.epochs, progress=True)
    pad_id = base.tokenizer.pad_token_id
    useful_tokens = args.epochs * sum(len(e) for e in examples)
    print(
        f"{len(examples)} examples ({sum(not e.positive for e in examples)} negatives), "
        f"{useful_tokens // args.epochs} tokens per epoch, {args.epochs} epoch(s)"
    )

    config = base.model.config
    d, inner = config.hidden_size, config.intermediate_size
    ceiling = gemm_ceiling([(1024, d, inner), (1024, inner, d), (1024, d, d), (1024, d, 4 * d)])
    print(f"fp32 GEMM ceiling: {ceiling:.1f} GFLOP/s")

    required = model_flops(config, adapter, len(base.tokenizer), examples, args.epochs)
    results = {}
    for name in ("hf", "seecl_unshared", "seecl"):
        model = fresh_model(base.model, adapter, base.indicators)
        if name == "hf":
            run = run_hf_trainer(model, examples, cfg, base.tokenizer)
        else:
            shared = cfg.share_prefix_tokens if name == "seecl" else 0
            run = run_seecl(model, examples, dataclasses.replace(cfg, share_prefix_tokens=shared), pad_id)
            run["flops"] = flops_computed(
                config,
                adapter,
                len(base.tokenizer),
                run["computed_tokens"],
                run["attention_pairs"],
                run["supervised_tokens"],
            )
            run["gflops"] = run["flops"] / run["seconds"] / 1e9
        run["model_gflops"] = required / run["seconds"] / 1e9
        run["final_loss"] = final_loss(model, examples, pad_id)
        run["useful_tokens_per_second"] = useful_tokens / run["seconds"]
        results[name] = run
        print(f"{name}: {run}")
        del model

    hf, unshared, ours = results["hf"], results["seecl_unshared"], results["seecl"]
    achieved = ours["gflops"]
    summary = {
        "speedup_vs_hf_trainer": ours["useful_tokens_per_second"] / hf["useful_tokens_per_second"],
        "speedup_without_prefix_sharing": unshared["useful_tokens_per_second"] / hf["useful_tokens_per_second"],
        "computed_token_share": ours["computed_tokens"] / useful_tokens,
        "loss_rel_diff": abs(ours["final_loss"] - hf["final_loss"]) / hf["final_loss"],
        "loss_rel_diff_unshared": abs(unshared["final_loss"] - hf["final_loss"]) / hf["final_loss"],
        "mfu": ours["model_gflops"] / ceiling,
        "hfu": achieved / ceiling,
        "mfu_hf_trainer": hf["model_gflops"] / ceiling,
        "model_gflops": ours["model_gflops"],
        "achieved_gflops": achieved,
        "model_flops": required,
        "gemm_ceiling_gflops": ceiling,
    }
    labels = {
        "hf": "transformers Trainer",
        "seecl_unshared": "seecl trainer, no prefix sharing",
        "seecl": "seecl trainer",
    }
    rows = [
        [
            labels[name],
            f"{run['useful_tokens_per_second']:.1f}",
            f"{run['seconds']:.0f}",
            f"{run['train_loss']:.4f}",
            f"{run['final_loss']:.4f}",
            f"{run['model_gflops'] / ceiling:.2f}",
            f"{run['gflops'] / ceiling:.2f}" if "gflops" in run else "",
        ]
        for name, run in results.items()
    ]
    print_table(
        "Training speed (SmolLM2-135M, LoRA r8 q/v, fp32 CPU)",
        ["trainer", "useful tok/s", "seconds", "mean train loss", "final loss", "MFU", "HFU"],
        rows,
    )
    print(
        f"speedup_vs_hf_trainer {summary['speedup_vs_hf_trainer']:.2f}  "
        f"loss_rel_diff {summary['loss_rel_diff']:.4f}  mfu {summary['mfu']:.2f}  hfu {summary['hfu']:.2f} "
        f"(ceiling {ceiling:.1f} GFLOP/s)"
    )
    write_json(
        __import__("pathlib").Path(args.out),
        {
            **summary,
            "runs": results,
            "examples": len(examples),
            "epochs": args.epochs,
            "useful_tokens": useful_tokens,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
