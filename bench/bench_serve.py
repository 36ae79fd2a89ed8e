"""`alignkit serve` throughput: 64 chat requests with batching vs one request at a time, side by side.

    .venv/bin/python bench/bench_serve.py [--model tiny|smollm2-135m] [--requests 64] [--tokens 32] [--modes ...]

Each request is one chat prompt from alignkit/bundled/instructions_train.jsonl (chat template applied by the
server), temperature 1, `max_tokens = min_tokens = --tokens`, so every request makes exactly that many tokens.
A real uvicorn server on loopback, driven over HTTP by httpx:

  sequential        one client, one request at a time (each waits for the previous answer)
  concurrent, b=1   64 clients at once, server batching off (--max-batch 1): requests queue and run one by one
  concurrent, b=64  64 clients at once, server batching on (--max-batch 64): requests that arrive together
                    share one sampler call

tokens/s = requests x tokens / wall time from the first request sent to the last answer received.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

from alignkit.models import load_model, tiny_causal_lm
from alignkit.serve import ServeConfig, create_app

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "alignkit" / "bundled" / "instructions_train.jsonl"


def messages(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    return [row["messages"][:1] for row in rows[:n]]


def start(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server


def run_mode(model, tokenizer, name: str, prompts, tokens: int, max_batch: int, concurrent: bool, port: int):
    app = create_app(model, tokenizer, ServeConfig(model=name, max_batch=max_batch))
    server = start(app, port)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def ask(msgs, http):
        t0 = time.perf_counter()
        r = http.post(url, json={"model": name, "messages": msgs, "max_tokens": tokens, "min_tokens": tokens,
                                 "temperature": 1.0})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == tokens
        return time.perf_counter() - t0

    limits = httpx.Limits(max_connections=len(prompts))
    with httpx.Client(timeout=600, limits=limits) as http:
        ask(prompts[0], http)  # warm-up
        app.state.engine.batches.clear()
        t0 = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(len(prompts)) as pool:
                latencies = list(pool.map(lambda m: ask(m, http), prompts))
        else:
            latencies = [ask(m, http) for m in prompts]
        wall = time.perf_counter() - t0
    batches = list(app.state.engine.batches)
    server.should_exit = True
    time.sleep(0.2)
    return wall, latencies, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer, SmolLM2 tokenizer) or a model name/path")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--port", type=int, default=18731)
    parser.add_argument("--modes", default="sequential,b1,batched", help="comma-separated subset of the three modes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        model, tokenizer = tiny_causal_lm(num_layers=2, hidden_size=64)
    else:
        model, tokenizer = load_model(args.model)
    prompts = messages(args.requests)
    modes = {"sequential": ("sequential", 64, False), "b1": ("concurrent, b=1", 1, True),
             "batched": (f"concurrent, b={args.requests}", args.requests, True)}
    modes = [modes[m] for m in args.modes.split(",")]
    print(f"model {args.model}, {args.requests} chat requests x {args.tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'mode':<20} {'wall s':>8} {'req/s':>8} {'tokens/s':>9} {'median latency s':>17} {'sampler calls':>14} {'rows per call':>15}")
    for i, (label, max_batch, concurrent) in enumerate(modes):
        wall, lat, batches = run_mode(model, tokenizer, args.model, prompts, args.tokens, max_batch, concurrent,
                                      args.port + i)
        n = len(prompts)
        print(f"{label:<20} {wall:>8.2f} {n / wall:>8.2f} {n * args.tokens / wall:>9.1f} {statistics.median(lat):>17.2f} "
              f"{len(batches):>14} {_sizes(batches):>15}", flush=True)


def _sizes(batches: list[int]) -> str:
    """Rows per sampler call: '5+59' for a few calls, else the mean."""
    return "+".join(map(str, batches)) if len(batches) <= 4 else f"mean {sum(batches) / len(batches):.1f}"


if __name__ == "__main__":
    main()
