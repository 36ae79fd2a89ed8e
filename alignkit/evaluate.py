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

``--generator``: samples from alignkit's sampler (builtin), a colocated vLLM engine holding the model's weights
(vllm; LoRA merged), or an OpenAI-compatible endpoint serving the model (http://HOST:PORT/v1). The endpoint
returns text: the length is then counted in tokens of the model's tokenizer (re-tokenised, EOS not counted),
the no-EOS share and the KL are not reported (no token ids or log-probs of the served model).

Judge win rate (``--judge SPEC --baseline B``): every sample is compared with the baseline's response to the same
prompt (the k-th sample of a prompt with the baseline's k-th) by a pairwise judge (``alignkit.feedback.judges``),
in both orders, averaged (RLAIF's debiasing, Lee et al. 2023): win = (P(candidate first preferred) +
1 − P(baseline first preferred)) / 2. The baseline is an earlier evaluate's ``X.samples.jsonl`` on the same prompts,
or ``base``: samples of the reference (the base model under a LoRA adapter, or ``--reference``) drawn in this run
with the same seed. ``X.verdicts.jsonl`` beside the output then holds one ``{win, candidate, baseline, prompt, ...}``
record per sample; ``alignkit report`` shows the raw and the length-controlled win rate from it.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import DataConfig, ModelConfig, OptionError, arg, at_least, checked, model_location
from alignkit.data import DataError, load_records
from alignkit.engine import default_threads
from alignkit.feedback.judges import DEFAULT_PRINCIPLE
from alignkit.generation import endpoint_samples, generator_arg, is_endpoint, make_sampler
from alignkit.models import adapter_disabled, load_model, load_tokenizer
from alignkit.online import (
    RolloutConfig,
    distinct_n,
    evaluate_policy,
    prompts_of,
    reference_logprobs,
    score,
    with_policy_logprobs,
)
from alignkit.rewards import load_reward


def judge_spec_problem(spec: str) -> str | None:
    """A judge spec's form (loading the judge waits until the run): see ``alignkit.feedback.judges.SPECS``."""
    if not spec or spec == "local" or spec.startswith(("local:", "http://", "https://")):
        return None
    if spec.startswith("reward:"):
        return None if spec[len("reward:") :] else "expected reward:SPEC (a reward source after the colon)"
    kind, _, attr = spec.partition(":")
    if attr and kind.replace(".", "").replace("_", "").isalnum():
        return None
    return "expected local[:MODEL], http(s)://HOST/v1|MODEL, reward:SPEC or module:function"


def baseline_problem(value: str) -> str | None:
    if not value or value == "base":
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        return "no such file (expected an evaluate X.samples.jsonl, or 'base')"
    return None


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
    generator: str = generator_arg()
    judge: str = arg("", "pairwise judge for a win rate against --baseline: local[:MODEL], http(s)://HOST/v1|MODEL, "
                     "reward:SPEC or module:function; writes <output stem>.verdicts.jsonl", check=judge_spec_problem)
    baseline: str = arg("", "what --judge compares with: an earlier evaluate's X.samples.jsonl on the same prompts, "
                        "or 'base' (the reference's samples, drawn in this run with the same seed)",
                        check=baseline_problem)
    judge_principle: str = arg(DEFAULT_PRINCIPLE, "the question the judge answers about the two responses")

    def check(self) -> None:
        if bool(self.judge) != bool(self.baseline):
            given, missing = ("judge", "baseline") if self.judge else ("baseline", "judge")
            raise OptionError(missing, "", f"--{given} needs --{missing} too")
        if self.judge and not self.output:
            raise OptionError("output", "", "--judge writes its verdicts beside --output X.json: give --output")


def policy_and_reference(model, reference: str, temperature: float, batch_size: int = 16):
    """rollout -> (policy log-probs, reference log-probs), both (B, T), or None when there is no reference; no-grad
    passes in chunks of ``batch_size`` rows (``kl_chunk_rows``)."""
    lora = hasattr(model, "disable_adapter")
    if not reference and not lora:
        return None
    # padding-free rows where they are cheaper (online.packed_rollout), the same layout on both sides
    return with_policy_logprobs(model, reference_logprobs(model, lora, reference, temperature, batch_size, packing=True),
                                temperature, batch_size, packing=True)


def kl_chunk_rows(prompts: list, max_new_tokens: int, tokens: int = 4096) -> int:
    """Rows per chunk of the KL passes: about ``tokens`` positions (the longest prompt + max_new_tokens per row),
    between 16 and 64. For the quick start's short rows (21 + 24 tokens) 64 rows ran ~10% faster than 16 (larger
    products); long rows keep 16, so the passes' activations stay as small as they were."""
    width = max((len(p.prompt_ids) for p in prompts), default=1) + max_new_tokens
    return max(16, min(64, tokens // width))


@checked
def run(cfg: EvalConfig) -> dict[str, float]:
    default_threads()
    base = read_baseline(cfg.baseline) if cfg.judge and cfg.baseline != "base" else None  # checked before any work
    samples: list[dict] = []
    if is_endpoint(cfg.generator):
        if cfg.baseline == "base":
            raise OptionError("baseline", "base", f"samples the reference locally; with --generator {cfg.generator} "
                                                  "give an earlier evaluate's X.samples.jsonl")
        metrics = evaluate_endpoint(cfg, samples)
    else:
        # a LoRA adapter stays attached: with the adapter disabled it is its own base, the default reference
        model, tokenizer = load_model(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code, merge_adapter=False)
        if cfg.baseline == "base" and not cfg.reference and not hasattr(model, "disable_adapter"):
            raise OptionError("baseline", "base", "needs a reference: a LoRA model (its base) or --reference")
        prompts = prompts_of(cfg.data, tokenizer, cfg.max_prompts, "evaluate")
        reward = load_reward(cfg.rollout.reward)
        ref_fn = policy_and_reference(model, cfg.reference, cfg.rollout.temperature,
                                      kl_chunk_rows(prompts, cfg.rollout.max_new_tokens))
        sampler = make_sampler(cfg.generator, model, tokenizer, cfg.data.max_length + cfg.rollout.max_new_tokens,
                               seed=cfg.seed, follow_updates=False)
        metrics = evaluate_policy(model, tokenizer, prompts, reward, cfg.rollout.sampling(), ref_fn, seed=cfg.seed,
                                  samples_per_prompt=cfg.rollout.group_size, batch_prompts=cfg.rollout.prompts_per_step,
                                  samples=samples, sampler=sampler)
    metrics = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    metrics.update(prompts=len(samples) // cfg.rollout.group_size, samples=len(samples))
    verdicts = None
    if cfg.judge:
        if base is None:
            base = baseline_samples(cfg, model, tokenizer, prompts, reward)
        verdicts = judge_samples(cfg, samples, base)
        wins = [v["win"] for v in verdicts]
        metrics.update({"judge/win_rate": sum(wins) / len(wins),
                        "judge/consistency": sum(v["consistent"] for v in verdicts) / len(verdicts)})
    print(f"{cfg.model.model}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()))
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(samples_path(out), "".join(json.dumps(s) + "\n" for s in samples))
        if verdicts is not None:
            _write_atomic(verdicts_path(out), "".join(json.dumps(v) + "\n" for v in verdicts))
        _write_atomic(out, json.dumps({"model": cfg.model.model, "reward": cfg.rollout.reward, **metrics}, indent=2))
    return metrics


def evaluate_endpoint(cfg: EvalConfig, samples: list[dict]) -> dict[str, float]:
    """``evaluate_policy``'s metrics for samples from an OpenAI-compatible endpoint (texts only): reward mean/std,
    length in the tokenizer's tokens, distinct-2. ``samples`` receives one record per sample."""
    if cfg.reference:
        raise ValueError(f"--reference: the KL needs the sampled tokens' log-probs; --generator {cfg.generator} "
                         "returns text only (use --generator builtin or vllm)")
    tokenizer = load_tokenizer(cfg.model.model, trust_remote_code=cfg.model.trust_remote_code)
    prompts = prompts_of(cfg.data, tokenizer, cfg.max_prompts, "evaluate")
    reward = load_reward(cfg.rollout.reward)
    n, step = cfg.rollout.group_size, cfg.rollout.prompts_per_step or len(prompts)
    texts, rows = [], []
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        texts += endpoint_samples(cfg.generator, [p.prompt for p in chunk], n, cfg.rollout.sampling(), cfg.seed + start)
        rows += [p for p in chunk for _ in range(n)]
    rewards = score(reward, rows, texts, None, tokenizer)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    samples.extend({"prompt": p.prompt, "completion": t, "reward": float(r), "length": k}
                   for p, t, r, k in zip(rows, texts, rewards.tolist(), lengths))
    return {"eval/reward/mean": float(rewards.mean()),
            "eval/reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "eval/response/length": float(statistics.fmean(lengths)), "eval/distinct-2": distinct_n(texts, 2)}


def baseline_samples(cfg: EvalConfig, model, tokenizer, prompts, reward) -> list[dict]:
    """The reference's samples on the same prompts with the same seed (``--baseline base``): the base model under
    the LoRA adapter, else the ``--reference`` model."""
    samples: list[dict] = []
    options = dict(seed=cfg.seed, samples_per_prompt=cfg.rollout.group_size, batch_prompts=cfg.rollout.prompts_per_step,
                   samples=samples)
    if cfg.reference:
        reference, _ = load_model(cfg.reference, trust_remote_code=cfg.model.trust_remote_code)
        evaluate_policy(reference, tokenizer, prompts, reward, cfg.rollout.sampling(), **options)
    else:  # a LoRA model (checked at the start)
        with adapter_disabled(model):
            evaluate_policy(model, tokenizer, prompts, reward, cfg.rollout.sampling(), **options)
    return samples


def _prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def read_baseline(path: str) -> list[dict]:
    """An evaluate X.samples.jsonl: {prompt, completion, ...} per line, checked line by line."""
    base = []
    for record in load_records(path):  # file:line in every error, malformed JSON included
        data = record.data
        if "prompt" not in data or not isinstance(data.get("completion"), str):
            raise DataError(f"{record.where}: expected an evaluate sample {{prompt, completion (a string), ...}}")
        base.append(data)
    if not base:
        raise DataError(f"{path}: no samples in it")
    return base


def judge_samples(cfg: EvalConfig, samples: list[dict], base: list[dict]) -> list[dict]:
    """One verdict record per sample: the judge's P(sample preferred over the baseline's), both orders averaged."""
    from alignkit.feedback.judges import load_judge

    source = cfg.baseline if cfg.baseline != "base" else "base (this run's reference samples)"
    by_prompt: dict[str, list[str]] = {}
    for record in base:
        by_prompt.setdefault(_prompt_key(record["prompt"]), []).append(record["completion"])
    seen: dict[str, int] = {}
    baselines = []
    for sample_ in samples:
        key = _prompt_key(sample_["prompt"])
        k = seen[key] = seen.get(key, -1) + 1
        if key not in by_prompt:
            raise DataError(f"--baseline {source}: has no response to the prompt {str(sample_['prompt'])[:80]!r} "
                            "(expected samples of the same prompts: the same --data and --max-prompts)")
        options = by_prompt[key]
        baselines.append(options[k % len(options)])
    judge = load_judge(cfg.judge, principle=cfg.judge_principle)
    verdicts = judge.compare([s["prompt"] for s in samples], [s["completion"] for s in samples], baselines)
    return [{"win": v.p_a, "candidate": s["completion"], "baseline": b, "prompt": s["prompt"], "p_candidate_first": v.p_ab,
             "p_baseline_first": v.p_ba, "consistent": v.consistent, "judge": v.judge, "model": cfg.model.model}
            for s, b, v in zip(samples, baselines, verdicts, strict=True)]


def verdicts_path(output: str | Path) -> Path:
    """Where ``evaluate --output X.json --judge ...`` writes its verdicts: X.verdicts.jsonl beside it (the report
    reads every ``*verdicts.jsonl``)."""
    output = Path(output)
    return output.with_name(output.stem + ".verdicts.jsonl")


def samples_path(output: str | Path) -> Path:
    """Where ``evaluate --output X.json`` writes its samples: X.samples.jsonl beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".samples.jsonl")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
