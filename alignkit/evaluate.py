"""``alignkit evaluate``: how a policy behaves on held-out prompts — the numbers every alignment run is judged by.

For each prompt, ``group_size`` responses are sampled (fixed seed, so two models are compared on the same
random stream) and scored by any reward source. Reported: mean/std reward, the KL to a reference model,
distinct-2 (falls when the policy collapses onto a few phrasings: reward hacking), mean response length and the
share of responses cut off without EOS.

The KL is the sequence-level Monte Carlo estimate mean over samples of Σ_t (log π_T(y_t) − log π_ref,T(y_t)),
where both log-probs are of softmax(logits / T) at the sampling temperature T (``--temperature``) and the
samples y are drawn from π_T. With ``--top-p 1`` it is therefore an unbiased estimate of KL(π_T ‖ π_ref,T), the
KL between the two models' temperature-T sampling distributions (over responses of at most
``--max-new-tokens`` tokens); at T = 1 that is KL(π ‖ π_ref). At T ≠ 1 it is not KL(π ‖ π_ref) of the models
themselves. With top-p < 1 the samples come from the renormalised nucleus distribution π' while the log-probs
are those of π_T, and the estimate is E_π'[log π_T − log π_ref,T] = KL(π' ‖ π_ref,T) − KL(π' ‖ π_T), which is
neither KL exactly.

The reference: ``--reference`` when given; else, for a LoRA run, the base model with the adapter disabled
(nothing loaded twice); else no KL is reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import DataConfig, ModelConfig, arg, at_least, checked, model_location
from alignkit.engine import default_threads
from alignkit.models import load_model
from alignkit.online import (
    RolloutConfig,
    evaluate_policy,
    prompts_of,
    reference_logprobs,
    with_policy_logprobs,
)
from alignkit.rewards import load_reward


@dataclass
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(data="bundled:movie_prompts_test", max_length=256))
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=4, prompts_per_step=64))
    reference: str = arg("", "reference model for the KL; empty: the base model under a LoRA adapter, else none",
                         check=model_location)
    max_prompts: int = arg(0, "evaluate only the first N prompts; 0: all", check=at_least(0))
    seed: int = arg(1234, "sampling seed (the same seed gives the same random stream for every model)")
    output: str = arg("", "also write the metrics as JSON to this file, and every sample to <its stem>.samples.jsonl")


def policy_and_reference(model, reference: str, temperature: float, batch_size: int = 16):
    """rollout -> (policy log-probs, reference log-probs), both (B, T), or None when there is no reference."""
    lora = hasattr(model, "disable_adapter")
    if not reference and not lora:
        return None
    return with_policy_logprobs(model, reference_logprobs(model, lora, reference, temperature, batch_size), temperature,
                                batch_size)


@checked
def run(cfg: EvalConfig) -> dict[str, float]:
    default_threads()
    # a LoRA adapter stays attached: with the adapter disabled it is its own base, the default reference
    model, tokenizer = load_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code, merge_adapter=False)
    prompts = prompts_of(cfg.data, tokenizer, cfg.max_prompts, "evaluate")
    reward = load_reward(cfg.rollout.reward)
    ref_fn = policy_and_reference(model, cfg.reference, cfg.rollout.temperature)
    samples: list[dict] = []
    metrics = evaluate_policy(model, tokenizer, prompts, reward, cfg.rollout.sampling(), ref_fn, seed=cfg.seed,
                              samples_per_prompt=cfg.rollout.group_size, batch_prompts=cfg.rollout.prompts_per_step,
                              samples=samples)
    metrics = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    metrics.update(prompts=len(prompts), samples=len(prompts) * cfg.rollout.group_size)
    print(f"{cfg.model.model}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()))
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(samples_path(out), "".join(json.dumps(s) + "\n" for s in samples))
        _write_atomic(out, json.dumps({"model": cfg.model.model, "reward": cfg.rollout.reward, **metrics}, indent=2))
    return metrics


def samples_path(output: str | Path) -> Path:
    """Where ``evaluate --output X.json`` writes its samples: X.samples.jsonl beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".samples.jsonl")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
