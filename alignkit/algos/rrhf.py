"""RRHF: rank K scored responses per prompt by the policy's length-normalised log-prob, plus SFT on the best.

Yuan et al. 2023 (https://arxiv.org/abs/2304.05302), eqs. 1-4: with p_i = Σ_t log π(y_i,t | x, y_i,<t) / |y_i|
and scores r_i (higher = better),

    loss = rank_weight · Σ_{r_i < r_j} max(0, p_i − p_j)  +  NLL(y_i'),   i' = argmax_i r_i

where the NLL is the token mean over y_i' (``losses.rrhf_loss``). No reference model and no sampling during
training: the responses are given. Their scores come from the records (``{"prompt", "responses", "scores"}``)
or, with ``--reward``, from a reward source (``alignkit.rewards.load_reward``: vader, a reward model
directory, module:function, ...) that scores every response once, before training; the records then need
no ``scores`` (any they have are ignored). All responses of a batch's prompts go through one forward pass,
Σ_b K_b rows, with no padding candidates.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from alignkit import losses
from alignkit.config import DataConfig, ModelConfig, arg, at_least, checked, need_data
from alignkit.data import DataError, RankedExample, Record, build_examples, load_records, ranked_example
from alignkit.data.collate import pad_prompt_completions
from alignkit.engine import Engine, TrainConfig, default_threads, distributed_state, total_steps_for
from alignkit.logprobs import LogprobModel
from alignkit.models import load_model
from alignkit.rewards import load_reward, reward_spec_problem
from alignkit.rewards.base import RewardSource, prompt_text


@dataclass
class RRHFConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    # the RRHF repository's train.sh: lr 2e-5, 3% warmup, cosine, 3 epochs, 8 prompts per device per step
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, warmup_ratio=0.03, epochs=3.0, batch_size=2,
                                                                   grad_accum=4))
    reward: str = arg("", "score the responses with this reward (vader, a reward model dir, module:function, ...) "
                          "instead of the records' scores", check=lambda spec: reward_spec_problem(spec) if spec else None)
    rank_weight: float = arg(1.0, "weight of the ranking loss; the SFT loss on the best response has weight 1 (paper 1)",
                             check=at_least(0))

    def check(self) -> None:
        need_data(self.data)


def _response_text(response) -> str | None:
    """What a reward source reads as the completion: the text, or the contents of a message list."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                       for m in response):
        return prompt_text(response)
    return None


def score_records(records: list[Record], reward: RewardSource, batch_size: int = 64) -> list[Record]:
    """Records with ``scores`` set by ``reward``, one per response; every response of every record is scored,
    in batches. A record whose prompt or responses are malformed is returned unchanged, so that
    ``ranked_example`` reports what is wrong with it (or skips it with --skip-invalid)."""
    jobs: list[tuple[int, object, str]] = []  # (record index, prompt, response text)
    for i, record in enumerate(records):
        prompt, responses = record.data.get("prompt"), record.data.get("responses")
        texts = [_response_text(r) for r in responses] if isinstance(responses, list) else [None]
        if prompt is not None and None not in texts:
            jobs += [(i, prompt, t) for t in texts]
    scores: dict[int, list[float]] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        values = reward([p for _, p, _ in chunk], [t for _, _, t in chunk]).tolist()
        for (i, _, _), value in zip(chunk, values, strict=True):
            scores.setdefault(i, []).append(float(value))
    return [Record({**r.data, "scores": scores[i]}, r.where) if i in scores else r for i, r in enumerate(records)]


def read_ranked(source, tokenizer, max_length: int, skip_invalid: bool, reward: RewardSource | None) -> list[RankedExample]:
    """Ranked examples from a data source; with a reward the scores are computed first (``score_records``)."""
    records = load_records(source)
    if reward is not None:
        given = sum("scores" in r.data for r in records)
        if given:
            print(f"alignkit: {source}: --reward replaces the scores of {given} records", file=sys.stderr)
        records = score_records(records, reward)
    examples, skipped = build_examples(records, _ranked_example, tokenizer, max_length, "skip" if skip_invalid else "raise",
                                       source)
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"alignkit: {source}: skipped {sum(skipped.values())} invalid records ({detail})", file=sys.stderr)
    return examples


def _ranked_example(record: Record, tokenizer, max_length: int | None) -> RankedExample:
    try:
        return ranked_example(record, tokenizer, max_length)
    except DataError as e:
        if e.reason == "missing field 'scores'":
            raise DataError(f"{e} (or pass --reward SPEC to score the responses)", reason=e.reason) from None
        raise


def collate_ranked(examples: list[RankedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Every response of B prompts as one row, right-padded: (R, L) input_ids / attention_mask / target_mask,
    R = Σ_b K_b. ``index`` (B, K) points each prompt's responses at their rows (-1 where a prompt has fewer
    than K); ``scores`` (B, K)."""
    k = max(len(e.responses_ids) for e in examples)
    index = torch.full((len(examples), k), -1, dtype=torch.long)
    scores = torch.zeros((len(examples), k), dtype=torch.float32)
    rows: list[tuple[list[int], list[int]]] = []
    for b, e in enumerate(examples):
        index[b, : len(e.responses_ids)] = torch.arange(len(rows), len(rows) + len(e.responses_ids))
        scores[b, : len(e.scores)] = torch.tensor(e.scores)
        rows += [(e.prompt_ids, r) for r in e.responses_ids]
    input_ids, attention_mask, target_mask = pad_prompt_completions(rows, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask,
            "index": index, "scores": scores}


def ranked_logps(module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised response log-probs p (B, K) and the presence mask (B, K), in one forward pass."""
    token = module(batch["input_ids"], batch["target_mask"], batch["attention_mask"])  # (R, L)
    avg = token.sum(-1) / batch["target_mask"].sum(-1).clamp(min=1)  # (R,)
    present = batch["index"] >= 0
    return torch.where(present, avg[batch["index"].clamp(min=0)], torch.zeros_like(present, dtype=avg.dtype)), present


def best_is_top(avg_logps: torch.Tensor, scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Fraction of prompts whose most likely response (highest p) is a best-scored one. (B, K) x 3 -> scalar."""
    top = avg_logps.masked_fill(~present, float("-inf")).argmax(-1, keepdim=True)  # (B, 1)
    best = scores.masked_fill(~present, float("-inf")).amax(-1)  # (B,)
    return (scores.gather(1, top).squeeze(1) == best).float().mean()


def rrhf_objective(avg_logps: torch.Tensor, scores: torch.Tensor, present: torch.Tensor,
                   rank_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-prompt RRHF losses (B,) and metrics; the SFT term is the token-mean NLL −p of the best response."""
    best = losses.rrhf_best_index(scores, present)  # (B,)
    best_nll = -avg_logps.gather(1, best[:, None]).squeeze(1)
    per_prompt, metrics = losses.rrhf_loss(avg_logps, scores, best_nll, present, rank_weight)
    return per_prompt, {**metrics, "best_is_top": best_is_top(avg_logps.detach(), scores, present)}


def ranking_loss(module, batch: dict[str, torch.Tensor], rank_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The training step's loss: RRHF summed over the batch's prompts (the engine divides by their number)."""
    avg_logps, present = ranked_logps(module, batch)
    per_prompt, metrics = rrhf_objective(avg_logps, batch["scores"], present, rank_weight)
    return per_prompt.sum(), {"loss": per_prompt.mean().item(), **{k: float(v) for k, v in metrics.items()}}


@checked
def train(cfg: RRHFConfig) -> Path:
    default_threads()
    reward = load_reward(cfg.reward) if cfg.reward else None
    torch.manual_seed(cfg.train.seed)  # a fresh LoRA adapter's initialisation: the same in every run and process
    model, tokenizer = load_model(cfg.model.model, lora=cfg.model.lora_settings(cfg.train.seed), trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    make = partial(read_ranked, tokenizer=tokenizer, max_length=cfg.data.max_length, skip_invalid=cfg.data.skip_invalid,
                   reward=reward)
    examples = make(cfg.data.data)
    eval_examples = make(cfg.data.eval_data) if cfg.data.eval_data else []

    total = total_steps_for(cfg.train, len(examples), distributed_state().num_processes)
    engine = Engine(cfg.train, model, tokenizer, total, train_module=LogprobModel(model),
                    run_config={"algo": "rrhf", **asdict(cfg)})
    k_max = max((len(e.responses_ids) for e in eval_examples), default=0)

    policy = engine.no_grad_module(LogprobModel(model))  # under FSDP the sharded module: gathers as in training

    def evaluate() -> dict[str, float]:
        with engine.inference():
            return _evaluate()

    def _evaluate() -> dict[str, float]:
        # all held-out prompts in one objective call, so rank agreement is over all their pairs
        avg, present, scores = [], [], []
        for start in range(0, len(eval_examples), 8):
            batch = engine.to_device(collate_ranked(eval_examples[start : start + 8], pad_id))
            with engine.autocast():
                a, p = ranked_logps(policy, batch)
            pad = (0, k_max - a.shape[1])  # prompts with fewer responses than the longest list
            avg.append(torch.nn.functional.pad(a, pad))
            present.append(torch.nn.functional.pad(p, pad))
            scores.append(torch.nn.functional.pad(batch["scores"], pad))
        per_prompt, metrics = rrhf_objective(torch.cat(avg), torch.cat(scores), torch.cat(present), cfg.rank_weight)
        return {f"eval/{k}": float(v) for k, v in {"loss": per_prompt.mean(), **metrics}.items()}

    collate = partial(collate_ranked, pad_id=pad_id)
    engine.fit(examples, collate, partial(ranking_loss, rank_weight=cfg.rank_weight),
               lambda batch: batch["index"].shape[0], evaluate if eval_examples else None,
               shown=("eval/loss", "eval/rank_agreement", "eval/best_is_top"))
    return engine.finish()
