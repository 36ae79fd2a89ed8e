"""Best-of-N sampling: for each prompt draw N responses from the policy and return the one with the highest
reward. No training; it is the baseline every RL method should beat at equal KL.

Its KL to the sampling policy π is usually quoted as (Stiennon et al. 2020, https://arxiv.org/abs/2009.01325)

    KL(π_BoN || π) = log N − (N − 1) / N

Beirami et al. 2024 (https://arxiv.org/abs/2401.01879, Theorem 3.1) show it is an upper bound: exact when the
rewards are continuous/distinct and every single response has vanishing probability (a large response space,
as for text), strictly smaller on a small discrete space (tests/test_raft.py checks both).

Output (``output_dir``), one line per prompt in each file:
- ``bon.jsonl``: {prompt, completion (the best), reward (its reward), responses (all N), scores (all N)} — the
  ranked shape, so ``alignkit rrhf`` trains on it directly (and ``alignkit sft`` on the best completions);
- ``pairs.jsonl``: {prompt, chosen (the best), rejected (the worst), margin (their reward difference)}, prompts
  whose N rewards are all equal left out — preference pairs labelled by the reward, for ``alignkit dpo`` or
  ``alignkit rm`` (the DPO paper's controlled-sentiment setup labels its pairs this way);
- ``summary.json``. Runs in one process.

Completions take the prompt's shape: plain text after a string prompt, ``[{"role": "assistant", "content": ...}]``
after a message-list prompt (what the data layer pairs with a conversation).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import DataConfig, ModelConfig, OptionError, arg, at_least, checked
from alignkit.engine import default_threads
from alignkit.generation import endpoint_samples, generator_arg, is_endpoint, make_sampler
from alignkit.models import load_model, load_tokenizer
from alignkit.online import RolloutConfig, ScoredRollout, prompts_of, rollout_and_score, score
from alignkit.rewards import load_reward


@dataclass
class BoNConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=8))
    output_dir: str = arg("runs/bon", "bon.jsonl (best completion per prompt) and summary.json go here")
    max_prompts: int = arg(0, "answer only the first N prompts of --data (or --eval-data); 0: all", check=at_least(0))

    seed: int = arg(0, "sampling seed")
    progress: bool = arg(True, "show a progress bar with ETA (prompts sampled and scored)")
    generator: str = generator_arg()

    def check(self) -> None:
        if not (self.data.data or self.data.eval_data):
            raise OptionError("data", "", "best-of-N needs prompts: --data (or --eval-data)")


def bon_kl(n: int) -> float:
    """KL(π_BoN || π) = log n − (n − 1)/n for best-of-n (Stiennon et al. 2020; Beirami et al. 2024, an upper
    bound that is tight for large response spaces). 0 for n = 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def as_completion(prompt, text: str):
    """A sampled text in the shape the data layer pairs with ``prompt``: an assistant turn after a conversation
    (message-list prompt), the plain text after a string prompt. So bon.jsonl reads as SFT and ranked data and
    pairs.jsonl as preference data for either prompt shape."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class BoNResult:
    path: Path  # bon.jsonl
    mean_best_reward: float  # E over prompts of max_i r_i
    mean_reward: float  # E over all samples: the single-sample (best-of-1) reward on the same samples
    n: int
    kl: float  # bon_kl(n)


@checked
@torch.no_grad()
def run(cfg: BoNConfig) -> BoNResult:
    default_threads()
    local = not is_endpoint(cfg.generator)
    if local:
        model, tokenizer = load_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
        model.requires_grad_(False)  # never trained: the sampler keeps its packed weights (rollout._decoder)
    else:  # the endpoint samples; the tokenizer still renders and checks the prompts
        model, tokenizer = None, load_tokenizer(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    reward = load_reward(cfg.rollout.reward)
    prompts = prompts_of(cfg.data, tokenizer, cfg.max_prompts, "best-of-N")
    n, per_batch = cfg.rollout.group_size, max(1, cfg.rollout.prompts_per_step)
    sampling = cfg.rollout.sampling()
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = make_sampler(cfg.generator, model, tokenizer, cfg.data.max_length + cfg.rollout.max_new_tokens,
                           seed=cfg.seed, follow_updates=False) if local else None

    best_rewards, all_rewards = [], []
    ranked_lines, pair_lines = [], []
    # the trainers' display (tqdm, on stderr), counted in prompts: each batch of prompts moves it once
    bar = tqdm(total=len(prompts), desc=f"best-of-{n}", unit="prompt", dynamic_ncols=True, disable=not cfg.progress)
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        if local:
            scored = rollout_and_score(model, tokenizer, chunk, reward, sampling, n, generator, sampler)
        else:
            texts = endpoint_samples(cfg.generator, [p.prompt for p in chunk], n, sampling, cfg.seed + start)
            rows = [p for p in chunk for _ in range(n)]
            scored = ScoredRollout(None, rows, texts, score(reward, rows, texts, None, tokenizer))
        groups = scored.rewards.view(-1, n)  # (G, N)
        best, worst = groups.argmax(-1), groups.argmin(-1)  # ties: the first sample
        for g, prompt in enumerate(chunk):
            texts = [as_completion(prompt.prompt, t) for t in scored.texts[g * n : (g + 1) * n]]
            record = {"prompt": prompt.prompt, "completion": texts[int(best[g])], "reward": float(groups[g, best[g]]),
                      "responses": texts, "scores": groups[g].tolist()}
            ranked_lines.append(json.dumps(record))
            margin = float(groups[g, best[g]] - groups[g, worst[g]])
            if margin > 0:
                pair_lines.append(json.dumps({"prompt": prompt.prompt, "chosen": texts[int(best[g])],
                                              "rejected": texts[int(worst[g])], "margin": margin}))
        best_rewards.append(groups.max(-1).values)
        all_rewards.append(scored.rewards)
        bar.update(len(chunk))
        bar.set_postfix({"best": f"{float(torch.cat(best_rewards).mean()):.4g}"}, refresh=False)
    bar.close()
    out_dir = Path(cfg.output_dir)
    path = out_dir / "bon.jsonl"
    n_pairs = len(pair_lines)
    result = BoNResult(path, float(torch.cat(best_rewards).mean()), float(torch.cat(all_rewards).mean()), n, bon_kl(n))
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    summary.update(prompts=len(prompts), pairs=n_pairs)
    # written only once everything is sampled, each file whole or not at all
    _write_atomic(path, "".join(line + "\n" for line in ranked_lines))
    _write_atomic(out_dir / "pairs.jsonl", "".join(line + "\n" for line in pair_lines))
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"best-of-{n} over {len(prompts)} prompts: mean best reward {result.mean_best_reward:.4f}, "
          f"mean single-sample reward {result.mean_reward:.4f}, KL(BoN || policy) = log {n} - {n - 1}/{n} = {result.kl:.4f}")
    print(f"wrote {path} and {n_pairs} preference pairs (best vs worst) to {out_dir / 'pairs.jsonl'}")
    return result
