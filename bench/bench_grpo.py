"""GRPO: alignkit against TRL's GRPOTrainer (and alignkit PPO on the same task), side by side in one run.

    .venv/bin/python bench/bench_grpo.py [--models tiny,smollm2] [--steps 3] [--beta 0.04] [--threads N]
                                         [--skip-trl] [--skip-ppo] [--lora]

Task (issue #4): 16 movie-review prompts (alignkit/bundled/movie_prompts_train.jsonl, plain text, no chat
template) x 4 samples x at most 32 new tokens per step, VADER sentiment of the completion as the reward,
temperature 1, β = 0.04 (both load a reference model), token-mean loss over the batch (TRL's "dapo"), one
optimizer step per rollout, lr 1e-6. TRL runs at its best setting on this machine: gradient checkpointing off,
the whole rollout as one batch, bf16 only where the CPU has native bf16 (as alignkit's ``mixed_precision auto``).
alignkit PPO runs the same prompts as 64 prompts x 1 sample with its value head and its default 4 PPO epochs.
Models: the tiny 2-layer, 128-wide llama with the SmolLM2 vocabulary, and SmolLM2-135M-Instruct.

Every run is its own process (its peak RSS is its own). Printed per run, as bench_dpo.py / bench_rm.py do: end to
end (process start to saved model), the median steady-state step (step k−1 -> k from the trainer's own log or a
callback, k >= 2, so step 1's warm-up is left out; with ``--steps 1`` that one step), start-up = end to end −
steps x steady step (imports, loading, the reference copy, step 1's warm-up, saving), the step's split into
rollout (sampling + scoring) and update (reference pass, policy forward + backward, AdamW; alignkit's
time/rollout and time/update; TRL's generation and reward calls timed by wrapping them), peak RSS, CPU seconds
and the load average. Each run's FLOP bound (``flops.online_step_flops``) counts the real tokens of its own steps:
the prompt lengths of the prompts the step drew (each prompt once, a prefix common to all once) and the response lengths it generated (no
``min_new_tokens`` is forced, so responses end at EOS: alignkit's from its logged response/length, TRL's from
the completion ids its reward function receives); step/bound uses the mean bound of the steady steps, e2e/bound
the sum over all steps. The header line gives alignkit GRPO's bound for the whole step and for the update alone.
Rates are this machine's matmul rate for the precision used; on a CPU with native bf16 the fp32 runs are
printed too. alignkit's sampler picks its own dtype (auto); the worker pins it to the run's precision through
ALIGNKIT_BF16, so an fp32 run samples in fp32 there too.

``--lora``: every arm trains a LoRA adapter instead (rank 16, alpha 32, no dropout, every linear layer of the
blocks, lr 5e-4, as the bundled recipes do; TRL through peft), the reference being the base with the adapter
disabled on both sides; the update's bound then counts forward + input gradients only (frozen weights get no
gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flops import (
    alternate,
    distinct_prompt_tokens,
    linear_params,
    machine_rates,
    model_path,
    online_step_flops,
    print_rounds,
    record,
    refresh_rates,
    report,
    run_worker,
)

PROMPTS = Path(__file__).resolve().parents[1] / "alignkit" / "bundled" / "movie_prompts_train.jsonl"
PROMPTS_PER_STEP, GROUP, NEW_TOKENS, MAX_LENGTH = 16, 4, 32, 256
LORA_R, LORA_ALPHA, LORA_LR = 16, 32, 5e-4  # --lora: the bundled recipes' adapter and learning rate
STARTED = time.perf_counter()  # the worker process's own start (imports included, as a user's run pays them)


def step_tokens(path: str, steps: int, n_prompts: int, seed: int, lengths: list[float], group: int) -> list[dict]:
    """Per step: the token counts of the prompts alignkit drew (prompt_batch, as the trainer does) and of the
    responses it generated (mean response/length x rows)."""
    from alignkit.models import load_tokenizer
    from alignkit.online import prompt_batch, read_prompts

    prompts = read_prompts(str(PROMPTS), load_tokenizer(path), MAX_LENGTH)
    out = []
    for step in range(steps):
        drawn = prompt_batch(prompts, step, n_prompts, seed)
        tokens, distinct = distinct_prompt_tokens([p.prompt_ids for p in drawn])
        out.append({"prompt_tokens": tokens, "prompts": distinct, "rows": len(drawn) * group,
                    "generated": round(lengths[step] * len(drawn) * group)})
    return out


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/update" in r]


def run_alignkit(path: str, steps: int, beta: float, out: Path, precision: str, lora: bool = False) -> dict:
    from alignkit.algos.grpo import GRPOConfig, train
    from alignkit.config import DataConfig, ModelConfig
    from alignkit.engine import TrainConfig
    from alignkit.online import RolloutConfig

    cfg = GRPOConfig(
        model=ModelConfig(model=path, lora=lora, lora_r=LORA_R, lora_alpha=LORA_ALPHA),
        data=DataConfig(data=str(PROMPTS), eval_data="", max_length=MAX_LENGTH),
        train=TrainConfig(output_dir=str(out), lr=LORA_LR if lora else 1e-6, batch_size=PROMPTS_PER_STEP * GROUP, grad_accum=1,
                          max_steps=steps, report_to="none", progress=False, mixed_precision=precision),
        rollout=RolloutConfig(reward="vader", prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP,
                              max_new_tokens=NEW_TOKENS, eval_prompts=0),
        beta=beta,
    )
    train(cfg)
    rows = metric_rows(out)
    lengths = [r["response/length"] for r in rows]
    return {"step_ends": [r["time"] for r in rows], "rollout_s": [r["time/rollout"] for r in rows],
            "update_s": [r["time/update"] for r in rows], "lengths": lengths, "rewards": [r["reward/mean"] for r in rows],
            "tokens": step_tokens(path, len(rows), PROMPTS_PER_STEP, cfg.train.seed, lengths, GROUP),
            # one minibatch, one pass, KL in the loss: grpo_step skips the old-logprob forward
            "bound": {"reference": beta > 0, "old_forward": False, "epochs": 1, "weight_grads": not lora}}


def run_ppo(path: str, steps: int, out: Path, precision: str, lora: bool = False) -> dict:
    """alignkit PPO on the same task: 64 prompts x 1 sample, value head, its default PPO epochs."""
    from alignkit.algos import ppo
    from alignkit.cli import _fields, build_config

    wanted = {"model": path, "data": str(PROMPTS), "eval_data": "", "reward": "vader", "max_new_tokens": NEW_TOKENS,
              "prompts_per_step": PROMPTS_PER_STEP * GROUP, "group_size": 1, "max_steps": steps, "output_dir": str(out),
              "report_to": "none", "progress": False, "eval_prompts": 0, "batch_size": PROMPTS_PER_STEP * GROUP,
              "grad_accum": 1, "lr": LORA_LR if lora else 1e-6, "mixed_precision": precision, "max_length": MAX_LENGTH,
              "lora": lora, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA}
    known = {name for name, *_ in _fields(ppo.PPOConfig)}
    cfg = build_config(ppo.PPOConfig, {k: v for k, v in wanted.items() if k in known})
    ppo.train(cfg)
    rows = metric_rows(out)
    lengths = [r["response/length"] for r in rows]
    return {"step_ends": [r["time"] for r in rows], "rollout_s": [r["time/rollout"] for r in rows],
            "update_s": [r["time/update"] for r in rows], "lengths": lengths, "rewards": [r["reward/mean"] for r in rows],
            "tokens": step_tokens(path, len(rows), PROMPTS_PER_STEP * GROUP, cfg.train.seed, lengths, 1),
            # old log-probs + values and the reference, recomputed before ppo_epochs passes (alignkit.algos.ppo)
            "bound": {"reference": True, "old_forward": True, "epochs": cfg.ppo_epochs, "weight_grads": not lora}}


def run_trl(path: str, steps: int, beta: float, out: Path, bf16: bool, lora: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.rewards.functions import vader_compound

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokens: list[dict] = []
    ends: list[float] = []
    rollout: list[float] = []  # per step: seconds in generation + reward calls
    begun: list[float] = []

    def vader(prompts, completions, completion_ids, **_):
        started = time.perf_counter()
        prompt_tokens, distinct = distinct_prompt_tokens([tokenizer(p)["input_ids"] for p in prompts])
        tokens.append({"prompt_tokens": prompt_tokens, "prompts": distinct, "rows": len(completion_ids),
                       "generated": sum(len(c) for c in completion_ids)})
        scores = [vader_compound(c) for c in completions]
        rollout[-1] += time.perf_counter() - started
        return scores

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begun.append(time.perf_counter())
            rollout.append(0.0)

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1,
        num_generations=GROUP, max_completion_length=NEW_TOKENS, max_steps=steps,
        learning_rate=LORA_LR if lora else 1e-6, beta=beta,
        loss_type="dapo", temperature=1.0, gradient_checkpointing=False, bf16=bf16, use_cpu=True,
        report_to="none", logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=vader, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimes()], peft_config=peft_config)
    generate = trainer._generate

    def timed_generate(*a, **kw):  # the sampling part of TRL's step, for the rollout / update split
        started = time.perf_counter()
        result = generate(*a, **kw)
        rollout[-1] += time.perf_counter() - started
        return result

    trainer._generate = timed_generate
    trainer.train()
    trainer.model.save_pretrained(out / "final")  # with --lora the adapter
    tokenizer.save_pretrained(out / "final")
    steps_s = [e - b for b, e in zip(begun, ends)]
    return {"step_ends": [t - STARTED for t in ends], "rollout_s": rollout[: len(ends)],
            "update_s": [s - r for s, r in zip(steps_s, rollout)], "tokens": tokens[: len(ends)],
            "lengths": [t["generated"] / t["rows"] for t in tokens[: len(ends)]],
            # with one generation per optimizer step TRL keeps no old log-probs (old = current, detached)
            "bound": {"reference": beta > 0, "old_forward": False, "epochs": 1, "weight_grads": not lora}}


def worker(args: argparse.Namespace) -> None:
    # alignkit's sampler picks bf16 by itself where it is native: pin it to this run's precision
    os.environ["ALIGNKIT_BF16"] = "1" if args.precision == "bf16" else "0"
    out, lora = Path(args.out), args.adapter == "lora"
    if args.worker == "trl":
        result = run_trl(args.model, args.steps, args.beta, out, args.precision == "bf16", lora)
    elif args.worker == "ppo":
        result = run_ppo(args.model, args.steps, out, args.precision, lora)
    else:
        result = run_alignkit(args.model, args.steps, args.beta, out, args.precision, lora)
    report(result, STARTED)


def launch(kind: str, model: str, out: Path, precision: str, steps: int, beta: float, threads: int,
           adapter: str = "full") -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--model", model, "--out", str(out),
               "--precision", precision, "--steps", str(steps), "--beta", str(beta), "--adapter", adapter]
    result = run_worker(command, threads)
    steady = slice(1, None) if result["steps"] >= 2 else slice(None)  # step 1 pays the warm-up
    if result["steps"] < 2:  # no step-to-step interval: the one step's own rollout + update
        result["step_s"] = result["rollout_s"][0] + result["update_s"][0]
    result["startup_s"] = result["total_s"] - result["steps"] * result["step_s"]
    result["rollout_med"] = statistics.median(result["rollout_s"][steady])
    result["update_med"] = statistics.median(result["update_s"][steady])
    result["steady"] = steady
    return result


def bounds(result: dict, body: int, head: int, rate: float) -> dict[str, float]:
    """Seconds at ``rate`` FLOP/s: sampling and update of a mean steady step, and all steps (end to end)."""
    per_step = [online_step_flops(body, head, t["prompt_tokens"], t["prompts"], t["rows"], t["generated"],
                                  **result["bound"]) for t in result["tokens"]]
    steady = per_step[result["steady"]]
    sampling = statistics.mean(s for s, _ in steady) / rate
    update = statistics.mean(u for _, u in steady) / rate
    return {"sampling": sampling, "update": update, "step": sampling + update,
            "e2e": sum(s + u for s, u in per_step) / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="rollout steps per run (>= 2 gives a steady median)")
    parser.add_argument("--models", default="tiny,smollm2", help="tiny, smollm2 (or a model name/path), comma-separated")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--lora", action="store_true", help="every arm trains a LoRA adapter (rank 16, alpha 32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate the arms this many rounds and keep each arm's fastest steady step")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0: torch's default); 1 avoids OpenMP stalls on a busy machine")
    parser.add_argument("--worker", choices=["alignkit", "trl", "ppo"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--out", "--precision", "--adapter"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps: expected at least 1")
    if args.worker:
        return worker(args)
    from alignkit.models import load_model

    rates = machine_rates(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    try:
        for name in args.models.split(","):
            path = model_path(name, work)
            body, head = linear_params(load_model(path)[0])
            for precision in rates:
                label = "bf16" if precision == "bf16" else "fp32"
                kinds = ["alignkit"] + ([] if args.skip_trl else ["trl"]) + ([] if args.skip_ppo else ["ppo"])

                def run(kind: str, round_: int, name=name, label=label, path=path, precision=precision) -> dict:
                    result = launch(kind, path, work / f"{kind}-{name}-{label}-{round_}", precision, args.steps,
                                    args.beta, args.threads, "lora" if args.lora else "full")
                    print(f"[{name} {label}] {kind} done: {result['total_s']:.1f} s (step {result['step_s']:.2f} s)",
                          flush=True)
                    return result

                results = alternate(kinds, args.repeat, run)
                refresh_rates(rates)
                rate = rates[precision] * 1e9
                ours = results["alignkit"]
                ak = bounds(ours, body, head, rate)
                print(f"\n[{name}, {label}] {PROMPTS_PER_STEP} prompts x {GROUP} samples x <= {NEW_TOKENS} tokens, "
                      f"beta {args.beta}, {args.steps} steps{', LoRA r16/alpha 32' if args.lora else ''}. FLOP bound of alignkit GRPO's steady step at "
                      f"{rates[precision]:.0f} GFLOP/s: {ak['step']:.3f} s = sampling {ak['sampling']:.3f} s + "
                      f"update {ak['update']:.3f} s; all steps {ak['e2e']:.2f} s")
                print(f"{'run':<20} {'end to end':>10} {'start-up':>9} {'step':>7} {'rollout':>8} {'update':>7} "
                      f"{'step/bound':>10} {'upd/bound':>9} {'e2e/bound':>9} {'peak RSS':>9} {'CPU':>6} {'load':>5} "
                      f"{'e2e vs ak':>9} {'step vs ak':>10}")
                for kind, r in results.items():
                    b = bounds(r, body, head, rate)
                    who = {"alignkit": "alignkit GRPO", "trl": "TRL GRPO (best)", "ppo": "alignkit PPO"}[kind]
                    print(f"{who:<20} {r['total_s']:9.1f}s {r['startup_s']:8.1f}s {r['step_s']:6.2f}s "
                          f"{r['rollout_med']:7.2f}s {r['update_med']:6.2f}s {r['step_s'] / b['step']:9.1f}x "
                          f"{r['update_med'] / b['update']:8.1f}x {r['total_s'] / b['e2e']:8.1f}x "
                          f"{r['peak_rss_mb']:7.0f}MB {r['cpu_s']:5.0f}s {r['load']:5.1f} "
                          f"{r['total_s'] / ours['total_s']:8.2f}x {r['step_s'] / ours['step_s']:9.2f}x")
                print("FLOP bound per run, steady step = sampling + update (s): " + "; ".join(
                    f"{k} {b['step']:.3f} = {b['sampling']:.3f} + {b['update']:.3f}"
                    for k, b in ((k, bounds(r, body, head, rate)) for k, r in results.items())))
                print("per step, distinct-prompt tokens P / generated tokens G (the bounds' counts): " + "; ".join(
                    f"{k} " + " ".join(f"{t['prompt_tokens']}/{t['generated']}" for t in r["tokens"])
                    for k, r in results.items()))
                print_rounds(results, args.repeat)
                record("grpo-lora" if args.lora else "grpo", model=name, precision=label, gflops=rates[precision], **{
                    f"{k}_{f}": v for k, r in results.items() for f, v in (
                        ("e2e", r["total_s"]), ("step", r["step_s"]), ("rollout", r["rollout_med"]),
                        ("update", r["update_med"]), ("bound_step", bounds(r, body, head, rate)["step"]))})
                print("alignkit GRPO mean reward per step: " + str([round(x, 3) for x in ours["rewards"]]), flush=True)
        print(f"machine load at the end: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
