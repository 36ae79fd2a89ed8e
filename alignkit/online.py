"""Pieces every online algorithm (PPO, GRPO, RLOO, REINFORCE++, RAFT, best-of-N) shares: prompt batches,
rollouts scored by any reward source, the metrics that expose reward hacking (KL, entropy, distinct-n, length)
beside the reward, and the trainers' outer loop (``rollout_loop``: sample, score, update, log, evaluate, save).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from alignkit.config import DataConfig, OptionError, above, arg, at_least, between, world_size
from alignkit.data import PromptExample, prompt_example, read_examples
from alignkit.data.collate import attention_pair_cost, pack_prompt_groups, plan_rows
from alignkit.generation import BUILTIN, make_sampler
from alignkit.logprobs import LogprobModel, can_pack, causal_lm
from alignkit.models import adapter_disabled, load_model
from alignkit.packing import packed_linears
from alignkit.rewards import RewardModelSource, RewardSource, reward_spec_problem
from alignkit.rollout import Rollout, SamplingConfig, sample


@dataclass
class RolloutConfig:
    """Sampling flags shared by the online algorithms."""

    reward: str = arg("vader", "reward source: vader, length:N, regex:PAT, exact, http://..., RM dir, module:function",
                      check=reward_spec_problem)
    prompts_per_step: int = arg(16, "prompts sampled per step", check=at_least(1))
    group_size: int = arg(4, "responses per prompt (GRPO/RLOO groups, RAFT/BoN candidates)", check=at_least(1))
    max_new_tokens: int = arg(32, "response length cap (EOS included)", check=at_least(1))
    temperature: float = arg(1.0, "sampling temperature (logits are divided by it in the loss too)", check=above(0))
    top_p: float = arg(1.0, "nucleus sampling mass; 1.0 = off", check=between(0, 1))
    eval_prompts: int = arg(32, "held-out prompts scored before and after training (0: none)", check=at_least(0))

    def check(self) -> None:
        if self.top_p == 0:
            raise OptionError("top_p", self.top_p, "expected a value in (0, 1]")

    def sampling(self, greedy: bool = False) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              greedy=greedy)


def read_prompts(source: str, tokenizer, max_length: int, skip_invalid: bool = False) -> list[PromptExample]:
    return read_examples(source, prompt_example, tokenizer, max_length, skip_invalid)


def run_prompts(data: DataConfig, tokenizer, eval_prompts: int) -> tuple[list[PromptExample], list[PromptExample]]:
    """An online trainer's prompts: all of ``--data``'s, and the first ``eval_prompts`` of ``--eval-data``'s (none
    without it, or when 0)."""
    prompts = read_prompts(data.data, tokenizer, data.max_length, data.skip_invalid)
    held_out = read_prompts(data.eval_data, tokenizer, data.max_length, data.skip_invalid) \
        if data.eval_data and eval_prompts > 0 else []
    return prompts, held_out[:eval_prompts]


def prompts_of(data: DataConfig, tokenizer, max_prompts: int = 0, command: str = "this command") -> list[PromptExample]:
    """The prompts of ``--data`` (else ``--eval-data``), the first ``max_prompts`` of them when > 0."""
    source = data.data or data.eval_data
    if not source:
        raise ValueError(f"{command} needs prompts: --data (or --eval-data)")
    prompts = read_prompts(source, tokenizer, data.max_length, data.skip_invalid)
    return prompts[:max_prompts] if max_prompts else prompts


def online_sampler(spec: str, model, tokenizer, max_model_len: int, seed: int = 0):
    """The sampler of an online trainer's ``--generator``: None for builtin (``rollout_and_score``'s default),
    else a colocated vLLM engine fed the policy's weights before every rollout (``alignkit.generation.vllm``)."""
    if spec == BUILTIN:
        return None
    if world_size() > 1:
        raise ValueError(f"--generator {spec}: the colocated engine runs in single-process training only here; "
                         "use --generator builtin under accelerate/torchrun")
    return make_sampler(spec, model, tokenizer, max_model_len, seed=seed, follow_updates=True)


def check_minibatches(prompts_per_step: int, group_size: int, batch_size: int, grad_accum: int) -> int:
    """Each process's rows of a step (its prompts x group_size) must split into whole minibatches of
    batch_size x grad_accum rows (one optimizer step each); checked before anything is loaded. Returns the
    number of those rows."""
    world = world_size()
    if prompts_per_step % world:
        raise OptionError("prompts_per_step", prompts_per_step, f"must be a multiple of the {world} processes")
    local_rows, minibatch = prompts_per_step // world * group_size, batch_size * grad_accum
    if local_rows % minibatch:
        raise OptionError("batch_size", batch_size, f"{local_rows} rows per process per step (prompts_per_step x "
                          f"group_size / processes) do not split into minibatches of batch_size x grad_accum = {minibatch}")
    return local_rows


def prompt_batch(prompts: list[PromptExample], step: int, n: int, seed: int) -> list[PromptExample]:
    """The ``n`` prompts of ``step``: a fresh seeded permutation per pass over the prompts (resumable)."""
    per_epoch = max(1, len(prompts) // n)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [prompts[i] for i in order[index * n : (index + 1) * n]]


@dataclass
class ScoredRollout:
    """``group_size`` responses for each prompt, consecutive (rows g*k .. g*k+k-1 share prompt g)."""

    rollout: Rollout
    prompts: list[PromptExample]  # one per row
    texts: list[str]
    rewards: torch.Tensor  # (B,) fp32
    reward_seconds: float = 0.0  # wall time of scoring (a reward model's forward, a judge's calls)


def rollout_and_score(
    model,
    tokenizer,
    prompts: list[PromptExample],
    reward: RewardSource,
    sampling: SamplingConfig,
    group_size: int = 1,
    generator: torch.Generator | None = None,
    sampler=None,
) -> ScoredRollout:
    """Sample ``group_size`` responses per prompt with the current policy and score each one; ``sampler`` (an
    ``alignkit.generation`` Sampler, e.g. vLLM's) replaces the builtin sampler on ``model`` when given."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        # each process samples its own prompts for a different number of steps, so the just-in-time gathers of
        # sharded weights could never pair up across processes: the whole weights must be in place
        raise RuntimeError("sampling from an FSDP-sharded policy: run it inside engine.gathered()")
    rows = [p for p in prompts for _ in range(group_size)]
    if sampler is None:
        rollout = sample(model, [p.prompt_ids for p in rows], sampling, tokenizer=tokenizer, generator=generator)
    else:  # token ids from another engine, moved to where the policy's log-probs are computed
        device = next(model.parameters()).device
        rollout = sampler([p.prompt_ids for p in rows], sampling, generator).to(device)
    texts = tokenizer.batch_decode(rollout.response_ids.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    # rewards live beside the log-probs they are combined with (the policy's device), whatever the source returns
    started = time.perf_counter()
    rewards = score(reward, rows, texts, rollout, tokenizer).to(rollout.response_ids.device)
    return ScoredRollout(rollout, rows, texts, rewards, time.perf_counter() - started)


def score(reward: RewardSource, rows: list[PromptExample], texts: list[str], rollout: Rollout | None, tokenizer) -> torch.Tensor:
    """Rewards (B,) for decoded responses; per-prompt columns (e.g. ``reference``) reach the source as lists,
    and a reward model with the policy's tokenizer reads the token ids directly."""
    columns: dict[str, Any] = {}
    for key in sorted({k for p in rows for k in p.extra}):
        columns[key + "s" if key == "reference" else key] = [p.extra.get(key) for p in rows]
    if isinstance(reward, RewardModelSource) and rollout is not None:  # no rollout: texts from an endpoint
        columns.update(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, tokenizer=tokenizer)
    return reward([p.prompt for p in rows], texts, **columns).float()


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens (Li et al. 2016); falls as a policy collapses."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


SHOWN = ("eval/reward/mean", "eval/kl", "eval/distinct-2")  # the held-out metrics printed before and after


def rollout_loop(engine, prompts: list[PromptExample], steps: int, prompts_per_step: int, group_size: int,
                 updates_per_step: int, reward: RewardSource, sampling: SamplingConfig, sampler,
                 update: Callable[[ScoredRollout], dict[str, float]], evaluate: Callable[[], dict[str, float]] | None,
                 checkpoint_after: Callable[[int], bool]):
    """The outer loop of the online trainers (PPO, GRPO/RLOO/REINFORCE++, RAFT), from ``--resume`` (or held-out
    evaluation before training) to the saved model; returns its path.

    Step k: this process's contiguous share of ``prompt_batch(prompts, k, prompts_per_step, seed)``,
    ``group_size`` samples each from the policy, scored by ``reward``; then ``update(scored)``, which makes
    ``updates_per_step`` optimizer steps and returns the step's metrics, logged with the rollout's metrics (means
    over the processes) and where the step's wall time went. The sampling generator is seeded by step and rank,
    so a resumed run draws the prompts and samples the uninterrupted one did. ``evaluate`` (None: no held-out
    prompts) runs before training, every ``--eval-steps`` steps and after; a checkpoint follows step k when
    ``checkpoint_after(k)`` (k counted from 1; never after the last step, which the final model covers).
    """
    cfg = engine.cfg
    local = prompts_per_step // engine.world_size  # a multiple: checked with the options, before anything loads
    if cfg.resume:
        engine.resume()
    elif evaluate is not None:
        engine.held_out(evaluate, "before", SHOWN, step=0)
    if engine.step % updates_per_step:
        raise RuntimeError(f"checkpoint at optimizer step {engine.step} is not at the end of an online step "
                           f"({updates_per_step} optimizer steps each)")
    engine.start_progress()
    for step in range(engine.step // updates_per_step, steps):
        started = time.time()
        mine = prompt_batch(prompts, step, prompts_per_step, cfg.seed)[engine.rank * local : (engine.rank + 1) * local]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7_919 + engine.rank)
        with engine.gathered():  # under FSDP: the policy's whole weights, in place, for the sampler
            scored = rollout_and_score(engine.model, engine.tokenizer, mine, reward, sampling, group_size, generator,
                                       sampler)
        sampled = time.time()
        logs = update(scored)
        logs = {**mean_across_processes(engine, rollout_metrics(scored)), **logs, **step_times(started, sampled, scored)}
        # the last step's policy is evaluated once, by the pass after training
        if cfg.eval_steps and evaluate is not None and (step + 1) % cfg.eval_steps == 0 and step + 1 < steps:
            logs.update(evaluate())
        engine.log(logs)
        if step + 1 < steps and checkpoint_after(step + 1):
            engine.save_checkpoint()
    engine.close_progress()
    if evaluate is not None:
        engine.held_out(evaluate, "after", SHOWN)
    return engine.finish()


def mean_across_processes(engine, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the processes (every process passes the same names)."""
    if engine.world_size == 1:
        return metrics
    names = sorted(metrics)
    values = engine.accelerator.reduce(torch.tensor([metrics[n] for n in names], device=engine.device), "mean")
    return dict(zip(names, values.tolist(), strict=True))


def step_times(started: float, sampled: float, scored: ScoredRollout) -> dict[str, float]:
    """Wall seconds of an online step (``time.time()`` stamps): time/rollout = sampling + scoring, time/reward =
    its scoring part, time/update = everything since ``sampled`` (the update's own time/reference included)."""
    return {"time/rollout": sampled - started, "time/reward": scored.reward_seconds, "time/update": time.time() - sampled}


def rollout_metrics(scored: ScoredRollout, prefix: str = "") -> dict[str, float]:
    lengths = scored.rollout.response_mask.sum(-1).float()
    return {
        f"{prefix}reward/mean": float(scored.rewards.mean()),
        f"{prefix}reward/std": float(scored.rewards.std()) if scored.rewards.numel() > 1 else 0.0,
        f"{prefix}response/length": float(lengths.mean()),
        f"{prefix}response/no_eos": float((~scored.rollout.ended_with_eos).float().mean()),
        f"{prefix}distinct-2": distinct_n(scored.texts, 2),
    }


@torch.no_grad()
def evaluate_policy(model, tokenizer, prompts: list[PromptExample], reward: RewardSource, sampling: SamplingConfig,
                    ref_logps_fn=None, seed: int = 1234, samples_per_prompt: int = 1,
                    batch_prompts: int = 0, samples: list[dict] | None = None, sampler=None) -> dict[str, float]:
    """Mean reward, distinct-2, length (and KL to the reference when ``ref_logps_fn`` is given) of
    ``samples_per_prompt`` samples per held-out prompt, drawn with a fixed seed so before/after numbers are
    comparable; sampled ``batch_prompts`` prompts at a time (0: all at once), by ``sampler`` when given (see
    ``rollout_and_score``). ``samples``, when given, receives
    one {prompt, completion, reward, length} record per sample (for reports)."""
    generator = torch.Generator().manual_seed(seed)
    step = batch_prompts or len(prompts)
    parts = [rollout_and_score(model, tokenizer, prompts[i : i + step], reward, sampling, samples_per_prompt, generator,
                               sampler) for i in range(0, len(prompts), step)]
    texts = [t for p in parts for t in p.texts]
    scored = ScoredRollout(concat_rollouts([p.rollout for p in parts]), [q for p in parts for q in p.prompts], texts,
                           torch.cat([p.rewards for p in parts]))
    metrics = rollout_metrics(scored, prefix="eval/")
    if samples is not None:
        lengths = scored.rollout.response_mask.sum(-1).tolist()
        samples.extend({"prompt": p.prompt, "completion": t, "reward": float(r), "length": int(n)}
                       for p, t, r, n in zip(scored.prompts, texts, scored.rewards.tolist(), lengths))
    if ref_logps_fn is not None:
        kls = []
        for part in parts:
            mask = part.rollout.response_mask.bool()
            policy, ref = ref_logps_fn(part.rollout)
            kls.append(((policy - ref) * mask).sum(-1))
        # sequence-level KL estimate E_pi[log pi(y) - log pi_ref(y)] over the sampled responses
        metrics["eval/kl"] = float(torch.cat(kls).mean())
    return metrics


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Rows of several rollouts in one: prompts left-padded, responses right-padded to the widest."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    response_width = max(p.response_ids.shape[1] for p in parts)

    def pad(x: torch.Tensor, width: int, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra))

    return Rollout(
        torch.cat([pad(p.prompt_ids, prompt_width, True) for p in parts]),
        torch.cat([pad(p.prompt_mask, prompt_width, True) for p in parts]),
        torch.cat([pad(p.response_ids, response_width, False) for p in parts]),
        torch.cat([pad(p.response_mask, response_width, False) for p in parts]),
        torch.cat([pad(p.logprobs, response_width, False) for p in parts]),
        torch.cat([p.ended_with_eos for p in parts]),
    )


def response_logprobs(module, rollout: Rollout, temperature: float = 1.0, packing: bool = False) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under ``module`` (a LogprobModel, possibly DDP-wrapped),
    logits divided by the sampling temperature; 0 on padding. Prompts are left-padded, so positions are
    counted from each row's first real token, as during sampling.

    Two layouts, equal log-probs (to rounding) and gradients. Padded rows: the rows of one prompt share its forward
    through a KV cache, and every response is computed to the longest one's length. With ``packing`` on a model
    with SDPA attention, padding-free rows where ``packed_rollout`` expects them to be cheaper (responses that end
    well before the cap): prompts and responses without their padding, several per row behind a block mask. The
    choice depends only on the rows, so the same rows take the same layout in every pass (policy, old policy,
    reference): a policy equal to its reference still has a KL of exactly 0."""
    return rollout_forward(module, rollout, packing, temperature=temperature)


def rollout_forward(module, rollout: Rollout, packing: bool, layout_model=None, **kwargs):
    """``module(input_ids, target_mask, attention_mask, position_ids, **kwargs)`` over the rollout's rows in the
    layout ``response_logprobs`` describes (``packed_layout`` of ``layout_model``, default ``module``), with the
    output, a tensor or a tuple of tensors and Nones, moved to the rollout's (B, T) response positions, 0 on padding.
    The module takes ``at=`` (padding-free rows) and ``shared_prefix=`` (padded rows): a LogprobModel, PPO's
    PolicyValueModel."""
    batch = packed_layout(module if layout_model is None else layout_model, rollout, packing)
    if batch is not None:
        out = module(batch["input_ids"], None, batch["attention_mask"], batch["position_ids"],
                     at=(batch["target_index"], batch["source_index"]), **kwargs)  # (tokens,) each

        def place(x: torch.Tensor) -> torch.Tensor:
            return unpack_responses(x, rollout, batch)
    else:
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        start = rollout.prompt_ids.shape[1]
        target = torch.zeros_like(input_ids, dtype=torch.bool)
        target[:, start:] = rollout.response_mask.bool()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # rows of one prompt (a GRPO group, RAFT's K candidates, PPO's group_size) share the prompt's forward
        out = module(input_ids, target, attention_mask, position_ids, shared_prefix=start, **kwargs)

        def place(x: torch.Tensor) -> torch.Tensor:
            return x[:, start:]
    return place(out) if isinstance(out, torch.Tensor) else tuple(None if x is None else place(x) for x in out)


def rollout_groups(rollout: Rollout) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, responses) token lists without padding, one per run of consecutive rows with the same prompt (a
    GRPO group; every row alone when the rows are shuffled); responses in row order."""
    groups: list[tuple[list[int], list[list[int]]]] = []
    lengths = rollout.response_mask.sum(-1).tolist()  # a response is a prefix of its row: right padding only
    for ids, mask, response, n in zip(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, lengths,
                                      strict=True):
        prompt = ids[mask.bool()].tolist()
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(response[:n].tolist())
        else:
            groups.append((prompt, [response[:n].tolist()]))
    return groups


def packed_rollout(rollout: Rollout, config) -> dict[str, torch.Tensor] | None:
    """The padding-free layout (``pack_prompt_groups``) of a rollout when it is estimated cheaper than the padded
    one, else None. Estimated cost = positions + α·(query, key) pairs that attention computes, α =
    ``attention_pair_cost(config)``. Padded: each distinct prompt once (its square), then every row to the longest
    response, attending to its prompt and itself. Packed: the rows ``plan_rows`` finds cheapest, with each prompt
    shared across its responses or copied to each. Rows nearly all at the cap keep the padded layout (SmolLM2, 16 x
    4 responses of 32 tokens after 14-token prompts: padded 2,272 positions, no packing fewer, all more pairs);
    responses that end anywhere pack (1-128 tokens, mean 66: 8,416 padded positions, 5,336 packed in 29 rows)."""
    alpha = attention_pair_cost(config)
    groups = rollout_groups(rollout)
    # from the masks, not the tensors' widths: trimmed and untrimmed copies of the same rows choose alike
    prompt_width, longest = int(rollout.prompt_mask.sum(-1).max()), int(rollout.response_mask.sum(-1).max())
    rows = rollout.response_ids.shape[0]
    best = len(groups) * prompt_width + rows * longest + alpha * (
        len(groups) * prompt_width**2 + rows * longest * (prompt_width + longest))
    chosen = None
    shared = [len(prompt) + sum(map(len, responses)) for prompt, responses in groups]
    copied = [len(prompt) + len(response) for prompt, responses in groups for response in responses]
    for share, sizes in ((True, shared), (False, copied)):
        planned, length = plan_rows(sizes, alpha)
        cost = len(planned) * length * (1 + alpha * length)
        if cost < best:
            best, chosen = cost, share
    return None if chosen is None else pack_prompt_groups(groups, pad_id=0, share_prompt=chosen, pair_cost=alpha)


def packed_layout(model, rollout: Rollout, packing: bool) -> dict[str, torch.Tensor] | None:
    """The padding-free layout that a pass of ``model`` (a causal LM or a module around one) takes for these rows,
    on their device, or None for the padded rows: when ``packing`` is asked, the model has SDPA attention and
    ``packed_rollout`` estimates it cheaper. Under FSDP each forward gathers the weights, so every process must
    run as many: packed is one forward and the padded layout may be two (a shared prompt's), hence packed only
    where every process packs (one all-reduce)."""
    if not packing or not can_pack(model):
        return None
    batch = packed_rollout(rollout, causal_lm(model).config)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        flag = torch.tensor([float(batch is not None)], device=rollout.response_ids.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        batch = batch if flag.item() > 0 else None
    return None if batch is None else {name: t.to(rollout.response_ids.device) for name, t in batch.items()}


def unpack_responses(values: torch.Tensor, rollout: Rollout, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(tokens,) per-response-token values of a ``packed_rollout`` layout -> (B, T) in the rollout's rows, 0 on
    padding (differentiable)."""
    prompt_length = rollout.prompt_mask.sum(-1).to(values.device)  # responses are numbered in row order
    response = batch["response_index"]
    column = batch["position_ids"].flatten()[batch["target_index"]] - prompt_length[response]
    return values.new_zeros(rollout.response_ids.shape).index_put((response, column), values)


def rows(rollout: Rollout, index: torch.Tensor | slice) -> Rollout:
    """Rows ``index`` of a rollout, with all-padding prompt and response columns trimmed."""
    prompt_mask, response_mask = rollout.prompt_mask[index], rollout.response_mask[index]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else 0
    width = max(1, int(response_mask.sum(-1).max()))
    return Rollout(rollout.prompt_ids[index, first:], prompt_mask[:, first:], rollout.response_ids[index, :width],
                   response_mask[:, :width], rollout.logprobs[index, :width], rollout.ended_with_eos[index])


@torch.no_grad()
def by_row_chunks(forward: Callable[[Rollout], Any], rollout: Rollout, batch_size: int, context=nullcontext):
    """``forward(part)`` inside ``context()`` over consecutive parts of ``batch_size`` rows (all-padding columns
    trimmed, ``rows``), no grad; its (b, t) output, a tensor or a tuple of them, placed at the rollout's (B, T)
    response positions in fp32, 0 beyond each part's width. The no-grad passes over a rollout (reference, old
    policy, PPO's old values) all take these chunks, so the same rows run the same shapes in each."""
    outs, single = None, True
    for start in range(0, rollout.response_ids.shape[0], batch_size):
        part = rows(rollout, slice(start, start + batch_size))
        with context():
            got = forward(part)
        single = torch.is_tensor(got)
        got = (got,) if single else got
        if outs is None:
            outs = [torch.zeros_like(rollout.logprobs, dtype=torch.float32) for _ in got]
        for out, x in zip(outs, got, strict=True):
            out[start : start + x.shape[0], : x.shape[1]] = x
    if outs is None:
        return torch.zeros_like(rollout.logprobs, dtype=torch.float32)
    return outs[0] if single else tuple(outs)


def batched_logprobs(module, rollout: Rollout, temperature: float, batch_size: int, context=nullcontext,
                     packing: bool = False) -> torch.Tensor:
    """(B, T) response log-probs in no-grad chunks of ``batch_size`` rows (old policy or reference)."""
    return by_row_chunks(lambda part: response_logprobs(module, part, temperature, packing), rollout, batch_size,
                         context)


def initial_copy(model, lora: bool, path: str = ""):
    """The reference of full fine-tuning: a frozen copy of the policy as it is now; None when the reference is
    the model at ``path`` or (LoRA) the policy with its adapter disabled. Taken before the ``Engine`` is built:
    under FSDP the engine shards the policy, and a sharded module cannot be copied."""
    return None if path or lora else copy.deepcopy(model).requires_grad_(False)


def reference_logprobs(model, lora: bool, path: str = "", temperature: float = 1.0, batch_size: int = 16,
                       autocast=nullcontext, device: torch.device | None = None, engine=None,
                       initial=None, packing: bool = False) -> Callable[[Rollout], torch.Tensor]:
    """``fn(rollout) -> (B, T)`` response log-probs under the reference π_ref of every KL term: the model at
    ``path`` when given; else, with LoRA, the policy's own base with the adapter disabled (no copy held); else
    ``initial`` (``initial_copy``), or a frozen copy of the policy's weights as they are now (so call it before
    any update or resume).

    Given the training ``engine``, a separate reference is placed by ``engine.frozen`` (under FSDP sharded like
    the policy: its passes are collectives, made equally often by every process since all have the same number
    of rollout rows), and the LoRA reference reads the policy inside ``engine.gathered()`` (whole weights).
    ``packing``: the padding-free layout of ``response_logprobs`` (where the reference model allows it).
    ``fn(rollout, packed_weights=True)`` multiplies by weights packed once for the call (``packing.packed_linears``,
    for ``with_policy_logprobs``: both sides alike); ``fn.packs_weights`` says whether it can (not when sharded)."""
    if path:
        ref_model, context = load_model(path)[0], nullcontext
    elif lora:
        ref_model, context = model, partial(adapter_disabled, model)
    else:
        ref_model, context = (initial if initial is not None else copy.deepcopy(model).requires_grad_(False)), nullcontext
    module = LogprobModel(ref_model)
    if engine is None:
        module = module.to(device) if path else module
    elif lora and not path:
        context = partial(_both, engine.gathered, context)
    else:
        module = engine.frozen(module)
    sharded = engine is not None and engine.sharded

    def ref_logps(rollout: Rollout, packed_weights: bool = False) -> torch.Tensor:
        with autocast(), (packed_linears(ref_model, autocast) if packed_weights and not sharded else nullcontext()):
            return batched_logprobs(module, rollout, temperature, batch_size, context, packing)

    ref_logps.packs_weights = not sharded
    return ref_logps


@contextmanager
def _both(first, second):
    with first(), second():
        yield


def with_policy_logprobs(model, reference: Callable[[Rollout], torch.Tensor], temperature: float = 1.0,
                         batch_size: int = 16, autocast=nullcontext, packing: bool = False):
    """``fn(rollout) -> (policy, reference)`` response log-probs (B, T) each, for KL estimates; ``reference`` is
    a ``reference_logprobs`` function. Both sides go through the same training forward, in the same chunks and
    precision, never the sampler's log-probs (another kernel, perhaps another precision: in bf16 they differ by
    ~1e-3 per token), so a policy equal to its reference has a KL of exactly 0 (``packing`` as given to
    ``reference_logprobs``: the same layout on both sides). Where the reference can (``packs_weights``: not
    sharded) both sides multiply by packed fp32 weights (``alignkit.packing``): the same products on both sides,
    ~1.15x faster on CPU. Under FSDP call it inside ``engine.gathered()``, as ``evaluate_policy`` and the sampler
    are."""
    policy = LogprobModel(model)
    packed = getattr(reference, "packs_weights", False)

    def logps(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            with packed_linears(model, autocast) if packed else nullcontext():
                mine = batched_logprobs(policy, rollout, temperature, batch_size, packing=packing)
            return mine, reference(rollout, packed_weights=packed)

    return logps
