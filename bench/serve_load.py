"""Serving under load: `seecl serve` answering concurrent clients against the same requests sent one at a time.

Starts `seecl serve` in its own process on an ensemble (`--ensemble`, e.g. the output of `seecl
demo`; without it, a tiny-random ensemble of three synthetic tasks is learned first, which only
checks the script) and sends `--requests` requests built from the ensemble's stored queries and a
few that no expert should claim: every other one streamed, chat and completions mixed, greedy, at
most `--max-tokens` tokens each. In one run:

- baseline: the requests one at a time (the next leaves when the previous answer is complete);
- load: all of them at once, at most `--concurrency` in flight, while /health is polled;

and reports for each: throughput (requests/s and generated tokens/s), request latency p50/p90/p99,
time to a stream's first chunk (it leaves once the first answer token exists) and first text
(answers start after whitespace, which is held back), and /health latency during the load. The greedy
answers of the load must equal the baseline's (`mismatches` counts those that do not: a batch can
move the last bits of a logit). The server runs with the environment's OMP_NUM_THREADS.

    OMP_NUM_THREADS=2 python bench/serve_load.py --ensemble seecl-demo --requests 50 --concurrency 50

writes results/bench/serve_load.json (`--out` to change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, print_table, write_json


def tiny_ensemble(directory: Path) -> Path:
    """Three briefly trained synthetic experts on the tiny random model: enough to exercise the server."""
    from seecl.config import load_config
    from seecl.data.synthetic import make_task
    from seecl.see.ensemble import SeeEnsemble

    settings = ["model.name=tiny-random", "train.lr=1e-2", "train.indicator_lr_scale=2", "train.epochs=8"]
    settings += ["train.batch_size=8", "train.micro_batch_size=8", "adapter.dropout=0.0", "train.progress=false"]
    ensemble = SeeEnsemble(directory, load_config(overrides=settings))
    for name in ("reverse_list", "uppercase", "add"):
        ensemble.learn(make_task(name, "train", 48))
    return directory


def workload(ensemble: Path, n: int, max_tokens: int) -> list[tuple[str, dict]]:
    """(path, body) of each request: stored queries of every expert in turn, and every fifth one
    a query for the base; every other request streamed, every third a plain completion."""
    from seecl.see.store import EnsembleStore

    store = EnsembleStore(ensemble)
    pools = [[item.query for item in store.memory(name).items] for name in store.expert_names()]
    others = ["What is a lighthouse?", "Write one sentence about the sea.", "Hi there, how are you today?"]
    requests = []
    for i in range(n):
        pool = pools[i % len(pools)] if pools and i % 5 else others
        query = pool[(i // max(1, len(pools))) % len(pool)]
        body = {"max_tokens": max_tokens, "stream": i % 2 == 0}
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
        if i % 3:
            requests.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": query}]}))
        else:
            requests.append(("/v1/completions", {**body, "prompt": query}))
    return requests


async def send(client, url: str, path: str, body: dict) -> dict:
    """One request: its latency, times to the first streamed chunk and text, answer text and tokens."""
    started = time.perf_counter()
    first = chunk = None
    if not body["stream"]:
        response = await client.post(url + path, json=body)
        response.raise_for_status()
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return {
            "latency": time.perf_counter() - started,
            "chunk": None,
            "first": None,
            "text": text,
            "tokens": data["usage"]["completion_tokens"],
        }
    pieces, tokens = [], 0
    async with client.stream("POST", url + path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = chunk if chunk is not None else time.perf_counter() - started
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("text") if "text" in choice else choice.get("delta", {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    pieces.append(piece)
    return {
        "latency": time.perf_counter() - started,
        "chunk": chunk,
        "first": first,
        "text": "".join(pieces),
        "tokens": tokens,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_phase(url: str, requests: list[tuple[str, dict]], concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)
        health: list[float] = []
        done = asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                started = time.perf_counter()
                (await client.get(url + "/health")).raise_for_status()
                health.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        async def one(path: str, body: dict) -> dict:
            async with gate:
                return await send(client, url, path, body)

        poller = asyncio.create_task(poll()) if concurrency > 1 else None
        started = time.perf_counter()
        results = await asyncio.gather(*(one(path, body) for path, body in requests))
        wall = time.perf_counter() - started
        done.set()
        if poller is not None:
            await poller
    latencies = [r["latency"] for r in results]
    firsts = [r["first"] for r in results if r["first"] is not None]
    chunks = [r["chunk"] for r in results if r["chunk"] is not None]
    return {
        "requests": len(results),
        "concurrency": concurrency,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
        "latency_p50": round(percentile(latencies, 0.5), 3),
        "latency_p90": round(percentile(latencies, 0.9), 3),
        "latency_p99": round(percentile(latencies, 0.99), 3),
        "first_chunk_p50": round(percentile(chunks, 0.5), 3) if chunks else None,
        "first_chunk_p90": round(percentile(chunks, 0.9), 3) if chunks else None,
        "first_text_p50": round(percentile(firsts, 0.5), 3) if firsts else None,
        "first_text_p90": round(percentile(firsts, 0.9), 3) if firsts else None,
        "health_p50": round(statistics.median(health), 4) if health else None,
        "health_max": round(max(health), 4) if health else None,
        "health_polls": len(health),
        "texts": [r["text"] for r in results],
    }


def start_server(ensemble: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, "-m", "seecl.cli", "serve", "--ensemble", str(ensemble), "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, server: subprocess.Popen, deadline_s: float = 600) -> None:
    import httpx

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if server.poll() is not None:
            raise SystemExit(f"seecl serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("seecl serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ensemble", help="ensemble directory (default: learn a tiny-random one, a smoke test)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        ensemble = Path(args.ensemble) if args.ensemble else tiny_ensemble(Path(scratch) / "ens")
        requests = workload(ensemble, args.requests, args.max_tokens)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = start_server(ensemble, port)
        try:
            wait_ready(url, server)
            asyncio.run(run_phase(url, requests[:2], 1))  # warm-up: first forwards, prefix cache entries
            baseline = asyncio.run(run_phase(url, requests, 1))
            load = asyncio.run(run_phase(url, requests, args.concurrency))
        finally:
            server.terminate()
            server.wait(60)
    mismatches = sum(a != b for a, b in zip(baseline.pop("texts"), load.pop("texts")))
    columns = ["requests_per_s", "tokens_per_s", "latency_p50", "latency_p90", "latency_p99"]
    columns += ["first_chunk_p50", "first_chunk_p90", "first_text_p50", "health_p50", "health_max"]
    rows = [
        [name, phase["concurrency"], *(phase[c] for c in columns)]
        for name, phase in (("one at a time", baseline), ("concurrent", load))
    ]
    print_table(
        f"seecl serve, {args.requests} requests, max_tokens {args.max_tokens}", ["phase", "concurrency", *columns], rows
    )
    speedup = load["requests_per_s"] / baseline["requests_per_s"]
    print(f"throughput x{speedup:.2f} over one at a time; {mismatches} answers differ between the two phases")
    write_json(
        Path(args.out),
        {
            "ensemble": str(args.ensemble or "tiny-random (smoke test)"),
            "max_tokens": args.max_tokens,
            "baseline": baseline,
            "load": load,
            "throughput_speedup": round(speedup, 3),
            "mismatches": mismatches,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
