"""How a multi-turn chat should be routed: on its last user turn (what seecl does) or on the whole conversation.

Builds conversations from an ensemble's stored queries (`--ensemble`, e.g. the output of `seecl
demo`; without it, a tiny-random ensemble of three synthetic tasks is learned first, which only
checks the script): the last user turn is a query of one expert's task, the `--turns` earlier
user turns queries of the other experts' tasks, each followed by a short assistant reply. Routes:

- last turn (seecl): the expert that routing the last user turn alone picks, the conversation
  then answered by it after every turn; accuracy = the last turn's own expert claims it;
- whole conversation: the turns joined into one query and routed like a single query (the other
  way to do it); accuracy as above, and `follows_history` = the share routed to an earlier
  turn's expert instead;

and the cost of answering after the history: engine time per query, answering each last turn
alone and after its conversation (`--max-tokens` tokens), one batch of all of them each.
The stored queries are training queries, so both accuracies are optimistic; their difference is
what this measures.

    OMP_NUM_THREADS=2 python bench/chat_routing.py --ensemble seecl-demo

writes results/bench/chat_routing.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine, print_table, write_json


def conversations(pools: dict[str, list[str]], n: int, turns: int):
    """(expert whose query is the last turn, earlier experts, Query) for n conversations."""
    from seecl.serving.routing import Query

    names = list(pools)
    out = []
    for i in range(n):
        target = names[i % len(names)]
        others = [names[(i + 1 + k) % len(names)] for k in range(turns) if names[(i + 1 + k) % len(names)] != target]
        history = []
        for k, other in enumerate(others):
            history += [("user", pools[other][(i + k) % len(pools[other])]), ("assistant", "Done.")]
        last = pools[target][i // len(names) % len(pools[target])]
        out.append((target, others, Query(last, tuple(history))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ensemble", help="ensemble directory (default: learn a tiny-random one, a smoke test)")
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--turns", type=int, default=1, help="earlier user turns per conversation")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "chat_routing.json"))
    args = parser.parse_args()

    from seecl.see.ensemble import SeeEnsemble
    from serve_load import tiny_ensemble

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.ensemble) if args.ensemble else tiny_ensemble(Path(scratch) / "ens")
        ensemble = SeeEnsemble.open(root)
        pools = {name: [item.query for item in ensemble.store.memory(name).items] for name in ensemble.experts()}
        chats = conversations(pools, args.conversations, args.turns)
        engine = ensemble.backend()
        last_turn = [r.answered_by for r in engine.route([q for _, _, q in chats])]
        joined = ["\n\n".join(text for _, text in q.turns()) for _, _, q in chats]
        whole = [r.answered_by for r in engine.route(joined)]
        engine.ask([q.text for _, _, q in chats[:2]], 2)  # warm-up
        started = time.perf_counter()
        engine.ask([q.text for _, _, q in chats], args.max_tokens)
        alone = (time.perf_counter() - started) / len(chats)
        started = time.perf_counter()
        engine.ask([q for _, _, q in chats], args.max_tokens)
        after_history = (time.perf_counter() - started) / len(chats)

    n = len(chats)
    rows = {
        "last turn (seecl)": {
            "accuracy": sum(got == target for got, (target, _, _) in zip(last_turn, chats)) / n,
            "follows_history": sum(got in others for got, (_, others, _) in zip(last_turn, chats)) / n,
        },
        "whole conversation": {
            "accuracy": sum(got == target for got, (target, _, _) in zip(whole, chats)) / n,
            "follows_history": sum(got in others for got, (_, others, _) in zip(whole, chats)) / n,
        },
    }
    print_table(
        f"routing {n} conversations with {args.turns} earlier turn(s)",
        ["rule", "accuracy", "follows_history"],
        [[name, f"{r['accuracy']:.3f}", f"{r['follows_history']:.3f}"] for name, r in rows.items()],
    )
    print(f"engine s/query: last turn alone {alone:.3f}, after its conversation {after_history:.3f}")
    write_json(
        Path(args.out),
        {
            "ensemble": str(args.ensemble or "tiny-random (smoke test)"),
            "conversations": n,
            "earlier_turns": args.turns,
            "routing": rows,
            "seconds_per_query": {"alone": round(alone, 4), "after_history": round(after_history, 4)},
            "max_tokens": args.max_tokens,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
