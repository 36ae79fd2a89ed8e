"""Losses and advantage estimators for aligning language models, as pure functions on tensors.

Conventions, shared by every function below:
- Sequence-level inputs are (B,) log-probs *summed* over the response tokens, unless the argument name
  says `avg` (summed log-prob divided by the number of response tokens).
- Token-level inputs are (B, T), aligned with a (B, T) 0/1 `mask` that is 1 on response tokens.
  Responses are right-padded (mask = 1...1 0...0) wherever the order of tokens matters (GAE, rewards).
- A loss returns `(losses, metrics)`: per-example losses, (B,) or (B, T) as documented, and a dict of
  detached scalar metrics (batch means). The caller reduces the losses (`.mean()` or `aggregate`).
- Advantage and KL estimators return plain tensors.
- No config objects, no distributed calls. Variants are separate functions; pick one at set-up time.

Paper index (function -> paper -> defaults as the paper gives them):
  bradley_terry_loss          Stiennon 2020 / Ouyang 2022 (InstructGPT) eq. 1    K=4..9 ranked, all pairs
  reward_centering_loss       Eisenstein 2023                                     coef 0.01 (TRL docs)
  dpo_sigmoid / dpo_loss      Rafailov 2023 eq. 7                                 beta 0.1
  dpo_sigmoid(label_smoothing) cDPO, Mitchell 2023                                eps e.g. 0.1
  dpo_ipo                     Azar 2023 eq. 17                                    tau (= beta) 0.1
  dpo_hinge                   Zhao 2023 (SLiC-HF) / Liu 2023 (RSO)                beta 0.1
  dpo_robust                  Chowdhury 2024 (rDPO)                               eps in [0, 0.5)
  simpo_loss                  Meng 2024 eq. 6                                     beta 2.0, gamma 0.5
  orpo_loss                   Hong 2024 eqs. 6-7                                  lambda 0.1
  kto_loss                    Ethayarajh 2024 eq. 7                               beta 0.1, lambda_D = lambda_U = 1
  rrhf_loss                   Yuan 2023 eqs. 1-4                                  k = 6 responses per query
  gae_advantages              Schulman 2015 (GAE) eq. 16                          InstructGPT PPO: gamma 1, lam 0.95
  kl_penalty_rewards          Ziegler 2019 eq. 2 / Stiennon 2020 eq. 2
  adaptive_kl_coef            Ziegler 2019 sec. 2.2                               K_beta = n/horizon (10000), clip 0.2
  ppo_policy_loss             Schulman 2017 eq. 7                                 clip 0.2
  ppo_value_loss              OpenAI baselines ppo2 / lm-human-preferences        clip 0.2
  kl_k1 / kl_k2 / kl_k3       Schulman 2020, "Approximating KL divergence" (blog)
  group_normalized_advantages Shao 2024 (GRPO) sec. 4.1.2
  grpo_policy_loss            Shao 2024 eq. 3 (loss) and eq. 4 (KL estimator)     clip 0.2, beta 0.04
  rloo_advantages             Ahmadian 2024                                       k = 2..4
  reinforce_pp_advantages     Hu 2025 (REINFORCE++)
  global_moments / masked_whiten  batch mean/var, summed across processes (all_sum) when distributed
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Masked reductions. Padding may hold -inf or NaN (e.g. log-probs of pad tokens), so values are
# selected with `where` rather than multiplied by the mask: NaN * 0 is NaN.
# ---------------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1, over `dim` (all dims when None)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1, over `dim` (all dims when None). An empty mask gives 0."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of `values` (all dims), Bessel-corrected when `unbiased`."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


AllSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over all training processes (``Engine.all_sum``); the identity in one process."""


def global_moments(
    values: torch.Tensor, mask: torch.Tensor, all_sum: AllSum | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries of `values` over the whole *global* batch.

    Each process contributes (Σx, Σx², n) of its own entries; one all-reduce sums them, then
    mean = Σx / n and var = (Σx² − n·mean²) / (n − 1). So 2 processes holding halves of a batch get
    the statistics of the whole batch, as 1 process would. Accumulated in float64, so the one-pass
    formula loses nothing against the two-pass one at the magnitudes of rewards and returns.
    Shapes: values, mask (B, T) -> two scalars in values.dtype.
    """
    x = torch.where(mask.bool(), values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
    sums = torch.stack([x.sum(), (x * x).sum(), mask.double().sum()])
    if all_sum is not None:
        sums = all_sum(sums)
    total, squares, n = sums.unbind()
    mean = total / n.clamp(min=1)
    var = ((squares - n * mean * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    return mean.to(values.dtype), var.to(values.dtype)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    all_sum: AllSum | None = None,
) -> torch.Tensor:
    """Whiten the masked entries of `values` over the whole batch: (x − mean) / sqrt(var + eps).

    With `shift_mean=False` the mean is added back (only the scale changes), as PPO implementations do
    for rewards. Used for PPO advantage whitening and REINFORCE++ return normalisation. These statistics
    are global by definition: under several processes pass `all_sum` (see `global_moments`) so the
    batch is the global batch, not each process's share. Padding -> 0. Shapes: values, mask (B, T) -> (B, T).
    """
    mean, var = global_moments(values, mask, all_sum)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def seq_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's tokens, then over sequences: every sequence weighs the same
    (GRPO paper eq. 3). Shapes: loss, mask (B, T) -> scalar."""
    return masked_mean(loss, mask, dim=-1).mean()


def token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all response tokens of the batch: every token weighs the same, so long responses
    count more (DAPO; TRL's "bnpo"). Shapes: loss, mask (B, T) -> scalar."""
    return masked_mean(loss, mask)


AGGREGATIONS = {"token-mean": token_mean, "seq-mean": seq_mean}


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar with `mode` in AGGREGATIONS."""
    return AGGREGATIONS[mode](loss, mask)


# ---------------------------------------------------------------------------------------------------
# Supervised fine-tuning.
# ---------------------------------------------------------------------------------------------------


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Negative log-likelihood of the response tokens: loss_t = −log π(y_t | x, y_<t).

    Shapes: token_logps, mask (B, T) -> per-token loss (B, T), 0 on padding; reduce it with
    `aggregate` (token-mean is the usual SFT choice).
    """
    nll = torch.where(mask.bool(), -token_logps, torch.zeros_like(token_logps))
    return nll, {"nll": masked_mean(nll, mask).detach()}


# ---------------------------------------------------------------------------------------------------
# Reward models (Bradley-Terry).
# ---------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    soft_label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss under the Bradley-Terry model.

        Δ = r(x, y_w) − r(x, y_l) − margin
        loss = −log σ(Δ)                                 (hard label)
        loss = −p·log σ(Δ) − (1 − p)·log σ(−Δ)           (soft label p = P(y_w ≻ y_l), e.g. from RLAIF)

    Stiennon et al. 2020, https://arxiv.org/abs/2009.01325, eq. 1; Ouyang et al. 2022 (InstructGPT),
    https://arxiv.org/abs/2203.02155, eq. 1. The margin follows Llama 2 (Touvron et al. 2023, eq. 2).
    Shapes: all inputs (B,) -> losses (B,). `accuracy` counts pairs ordered like the label (p > 0.5).
    """
    delta = chosen_rewards - rejected_rewards
    logits = delta if margin is None else delta - margin
    if soft_label is None:
        losses = -F.logsigmoid(logits)
        correct = delta > 0
    else:
        losses = -soft_label * F.logsigmoid(logits) - (1 - soft_label) * F.logsigmoid(-logits)
        correct = (delta > 0) == (soft_label > 0.5)
    metrics = {
        "accuracy": correct.float().mean(),
        "margin": delta.mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


def reward_centering_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, coef: float = 0.01
) -> torch.Tensor:
    """Auxiliary term that pulls the rewards of a pair towards zero sum: coef·(r_w + r_l)².

    The Bradley-Terry loss only sees differences, so rewards can drift; centering makes them comparable
    across prompts. Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244 (TRL's
    `center_rewards_coefficient`, suggested 0.01). Shapes: (B,) -> (B,).
    """
    return coef * (chosen_rewards + rejected_rewards) ** 2


def ranking_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (better, worse) among K ranked responses to one prompt: C(K, 2) pairs when
    there are no ties (ties give no pair). Higher score = better; pass −rank for a ranking.

    Shapes: scores (K,) -> (better_idx (P,), worse_idx (P,)), int64.
    """
    better, worse = torch.nonzero(scores[:, None] > scores[None, :], as_tuple=True)
    return better, worse


def ranked_bradley_terry_loss(
    rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """InstructGPT's K-way loss: all C(K, 2) pairs of a prompt in one batch element, averaged per prompt.

        loss(x) = −1/#pairs · Σ_{s_i > s_j} log σ(r_i − r_j)

    Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1 (pairs of one prompt stay in one batch
    element, so the reward model sees each response once and does not overfit).
    Shapes: rewards, scores (B, K) (higher score = better), mask (B, K) marks present responses ->
    losses (B,). Ties and missing responses give no pair.
    """
    present = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    pairs = (scores[:, :, None] > scores[:, None, :]) & present[:, :, None] & present[:, None, :]  # (B, K, K)
    diff = rewards[:, :, None] - rewards[:, None, :]  # r_i − r_j, (B, K, K)
    pair_losses = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff))
    n_pairs = pairs.sum(dim=(1, 2))
    losses = pair_losses.sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    metrics = {
        "accuracy": masked_mean((diff > 0).float(), pairs),
        "pairs": n_pairs.float().mean(),
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# DPO family: offline preference losses on (chosen, rejected) pairs.
# h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), the implicit reward margin / β.
# ---------------------------------------------------------------------------------------------------


def _preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    return {k: v.detach() for k, v in metrics.items()}


def _dpo_logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    metrics = _preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen_logps, policy_rejected_logps
    )
    return chosen_logratios - rejected_logratios, metrics


def dpo_sigmoid(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO: loss = −log σ(β·h); with label smoothing ε (cDPO): −(1 − ε)·log σ(β·h) − ε·log σ(−β·h).

    Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7. cDPO: Mitchell 2023, "A note on DPO
    with noisy preferences", https://ericmitchell.ai/cdpo.pdf (ε = the probability a label is flipped).
    Inputs: summed response log-probs (B,) -> losses (B,). Implicit rewards β·(log π − log π_ref).
    """
    h, metrics = _dpo_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, metrics


def dpo_ipo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """IPO: loss = (h − 1/(2β))², a squared loss that keeps h finite where DPO drives it to infinity.

    Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17 (β is the paper's τ).
    Pass *length-averaged* log-probs (summed log-prob / number of response tokens) for all four inputs:
    that is what the IPO authors ran and what TRL does; with sums, the target 1/(2β) would have to grow
    with the response length. Shapes: (B,) -> (B,). Label smoothing is not defined for IPO.
    """
    if label_smoothing:
        raise ValueError("label_smoothing is not defined for IPO")
    h, metrics = _dpo_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (h - 1 / (2 * beta)) ** 2, metrics


def dpo_hinge(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Hinge (SLiC calibration loss with the reference model, as normalised in RSO): relu(1 − β·h).

    Zhao et al. 2023 (SLiC-HF), https://arxiv.org/abs/2305.10425; Liu et al. 2023 (RSO),
    https://arxiv.org/abs/2309.06657. Shapes: (B,) -> (B,). Label smoothing is not defined for it.
    """
    if label_smoothing:
        raise ValueError("label_smoothing is not defined for the hinge loss")
    h, metrics = _dpo_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1 - beta * h), metrics


def dpo_robust(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Robust DPO (rDPO): an unbiased estimate of the clean-label DPO loss when labels flip with rate ε.

        loss = ((1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))) / (1 − 2ε)

    Chowdhury et al. 2024, "Provably Robust DPO", https://arxiv.org/abs/2403.00409. Unlike cDPO, the
    flipped term is *subtracted*, so the loss can be negative. Requires 0 ≤ ε < 0.5. (B,) -> (B,).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h, metrics = _dpo_logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * label_smoothing), metrics


DPO_LOSSES = {"sigmoid": dpo_sigmoid, "ipo": dpo_ipo, "hinge": dpo_hinge, "robust": dpo_robust}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO-family loss chosen by name from DPO_LOSSES (see each function for its formula and paper).

    Convenience entry point; a training loop should look the function up once, at set-up.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {sorted(DPO_LOSSES)}")
    return DPO_LOSSES[loss_type](
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: reference-free, length-normalised reward with a target margin γ.

        z = β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ
        loss = −(1 − ε)·log σ(z) − ε·log σ(−z)          (ε = 0 in the paper)

    Meng et al. 2024, https://arxiv.org/abs/2405.14734, eq. 6. `gamma` is the paper's γ, the margin in
    reward units. The SimPO repository configures γ/β instead (`gamma_beta_ratio`, default 0.25 with
    β = 2.0, so γ = 0.5); TRL's CPOTrainer (`loss_type="simpo"`) takes γ itself as `simpo_gamma`
    (default 0.5). Paper settings range from β = 2.0, γ = 1.0 (Llama-3-Base) to β = 2.5, γ ≈ 1.4
    (Llama-3-Instruct). Inputs: summed log-probs and response lengths in tokens, (B,) -> losses (B,).
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    z = beta * chosen_avg - beta * rejected_avg - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _preference_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012, "Accurately computing
    log(1 − exp(−|a|))"): expm1 near 0, log1p far from it, switching at −log 2."""
    # p = 1 exactly has infinite odds; a tiny clamp keeps the loss and its gradient finite.
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    lambda_: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: SFT on the chosen response plus an odds-ratio penalty, no reference model.

        odds(y) = P(y) / (1 − P(y)),  P(y) = exp(mean_t log π(y_t))   (length-normalised likelihood)
        log odds(y) = log P − log(1 − P)
        loss = NLL(y_w) + λ·(−log σ(log odds(y_w) − log odds(y_l)))

    Hong et al. 2024, https://arxiv.org/abs/2403.07691, eqs. 6-7 (λ = 0.1 in the paper's experiments;
    TRL's ORPOConfig calls it `beta`, default 0.1). Computed in fp32: log(1 − P) needs the precision.
    Shapes: chosen/rejected average log-probs (B,), chosen_nll (B,) (the chosen response's token-mean
    NLL) -> losses (B,).
    """
    chosen, rejected = chosen_avg_logps.float(), rejected_avg_logps.float()
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))  # (B,)
    odds_ratio_loss = -F.logsigmoid(log_odds)
    losses = chosen_nll.float() + lambda_ * odds_ratio_loss
    metrics = {
        "nll": chosen_nll.mean(),
        "odds_ratio_loss": odds_ratio_loss.mean(),
        "log_odds_ratio": log_odds.mean(),
        "rewards/accuracies": (log_odds > 0).float().mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable examples.
# ---------------------------------------------------------------------------------------------------


def kto_kl_estimate(
    mismatched_policy_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor
) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))), with no gradient.

    The pairs (x, y') are mismatched: y' is another example's completion (TRL shifts completions by one
    within the batch), so that z0 estimates KL(π ‖ π_ref) rather than the reward of the labelled y.
    Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, sec. 4. Shapes: (M,) -> scalar.
    In multi-process training, gather the log-ratios of all processes before calling this.
    """
    return (mismatched_policy_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO: a prospect-theoretic value of each completion relative to the reference point z0.

        r = log π(y|x) − log π_ref(y|x)
        desirable:    λ_D·(1 − σ(β·(r − z0)))
        undesirable:  λ_U·(1 − σ(β·(z0 − r)))

    Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, eq. 7 (β = 0.1; λ_D = λ_U = 1, and the
    paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3] for imbalanced data). z0 comes from `kto_kl_estimate`;
    it is detached and clamped at 0 here as well. Shapes: policy/ref summed log-probs (B,), is_desirable
    bool (B,), kl_estimate scalar -> losses (B,).
    """
    logratios = policy_logps - ref_logps
    z0 = torch.as_tensor(kl_estimate, dtype=logratios.dtype, device=logratios.device)
    z0 = z0.detach().clamp(min=0).reshape(())  # a scalar, also when given as a 1-element tensor
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    is_desirable = is_desirable.bool()
    losses = torch.where(is_desirable, desirable, undesirable)
    rewards = beta * logratios
    chosen_rewards = masked_mean(rewards, is_desirable)
    rejected_rewards = masked_mean(rewards, ~is_desirable)
    metrics = {
        "kl": z0,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": masked_mean(policy_logps, is_desirable),
        "logps/rejected": masked_mean(policy_logps, ~is_desirable),
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# RRHF: rank K sampled responses by length-normalised log-prob.
# ---------------------------------------------------------------------------------------------------


def rrhf_best_index(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the best-scored present response per query, the one RRHF fine-tunes on.
    Shapes: scores (B, K), mask (B, K) -> (B,) int64."""
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
    return scores.argmax(dim=-1)


def rrhf_loss(
    avg_logps: torch.Tensor,
    scores: torch.Tensor,
    best_nll: torch.Tensor,
    mask: torch.Tensor | None = None,
    rank_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """RRHF: hinge ranking loss on length-normalised log-probs plus SFT on the best response.

        p_i = Σ_t log π(y_i,t) / |y_i|
        L_rank = Σ_{r_i < r_j} max(0, p_i − p_j),   L_ft = NLL(y_i'), i' = argmax_i r_i
        L = rank_weight·L_rank + L_ft

    Yuan et al. 2023, https://arxiv.org/abs/2304.05302, eqs. 1-4 (the unweighted sum was best; k = 6
    responses per query). The sum over pairs is not normalised, as in the paper. `best_nll` is the
    caller's NLL of `rrhf_best_index` (the paper sums token NLLs, its code averages them).
    Shapes: avg_logps, scores, mask (B, K), best_nll (B,) -> losses (B,). `rank_agreement` is the
    fraction of ordered pairs where p orders the responses like the scores do.
    """
    present = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    # pairs[b, i, j]: response i scored below response j, both present.
    pairs = (scores[:, :, None] < scores[:, None, :]) & present[:, :, None] & present[:, None, :]
    diff = avg_logps[:, :, None] - avg_logps[:, None, :]  # p_i − p_j, (B, K, K)
    rank = torch.where(pairs, torch.relu(diff), torch.zeros_like(diff)).sum(dim=(1, 2))
    losses = rank_weight * rank + best_nll
    metrics = {
        "rank_loss": rank.mean(),
        "nll": best_nll.mean(),
        "rank_agreement": masked_mean((diff < 0).float(), pairs),
    }
    return losses, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# KL estimators, per token, from samples y ~ π: with r = π_ref(y)/π(y), KL(π ‖ π_ref) = E_π[−log r].
# Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html.
# ---------------------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = −log r = log π − log π_ref: unbiased, high variance, negative on some samples."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½·(log r)²: biased (exact to second order when π ≈ π_ref), low variance, ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r: unbiased (E_π[r] = 1), low variance, ≥ 0 since log r ≤ r − 1.
    GRPO's KL term (Shao et al. 2024, eq. 4)."""
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - 1 - log_r


# ---------------------------------------------------------------------------------------------------
# PPO for RLHF: KL-penalised rewards, adaptive KL coefficient, GAE, clipped policy and value losses.
# ---------------------------------------------------------------------------------------------------


def kl_penalty_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token PPO rewards: −β·(log π − log π_ref) at every response token, plus the sequence score
    at the last real token.

        R(x, y) = r(x, y) − β·log(π(y|x) / π_ref(y|x)), spread over tokens as above.

    Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, eq. 2; Stiennon et al. 2020,
    https://arxiv.org/abs/2009.01325, eq. 2. Rewards are constants of the rollout: inputs are detached.
    Shapes: score (B,), logprobs, ref_logprobs, mask (B, T) right-padded -> rewards (B, T), 0 on padding.
    """
    score, logprobs, ref_logprobs = score.detach(), logprobs.detach(), ref_logprobs.detach()
    kl = torch.where(mask.bool(), kl_k1(logprobs, ref_logprobs), torch.zeros_like(logprobs))  # (B, T)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (mask.long() * positions).argmax(dim=1)  # index of the last response token, (B,)
    rewards = rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))
    seq_kl = kl.sum(dim=1)
    metrics = {"kl": seq_kl.mean(), "kl_penalty": -kl_coef * seq_kl.mean(), "score": score.mean()}
    return rewards, metrics


def adaptive_kl_coef(coef: float, current_kl: float, target: float, k_beta: float = 0.1) -> float:
    """Adaptive KL controller: β ← β·(1 + K_β·clip((KL − KL_target)/KL_target, −0.2, 0.2)).

    Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, sec. 2.2 (K_β = 0.1 in the text). Their code
    (lm-human-preferences) and TRL's AdaptiveKLController use K_β = n_steps / horizon, with n_steps the
    episodes in this update and horizon 10 000, so that β moves at the same rate per episode whatever the
    batch size; alignkit's PPO passes k_beta=n_steps / horizon. `current_kl` is the mean per-sequence KL
    of the batch.
    """
    error = min(max((current_kl - target) / target, -0.2), 0.2)
    return coef * (1 + k_beta * error)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: A_t = Σ_l (γλ)^l·δ_{t+l}, returns = A + V.

    Schulman et al. 2015, https://arxiv.org/abs/1506.02438, eq. 16; InstructGPT/PPO for LMs uses
    γ = 1, λ = 0.95. The response ends at the last real token (its next value is 0).
    Shapes: rewards, values, mask (B, T), right-padded -> (advantages, returns), (B, T), detached,
    0 on padding. Padding values and rewards are ignored.
    """
    keep = mask.bool()
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards)).detach()
    values = torch.where(keep, values, torch.zeros_like(values)).detach()
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        # TD error δ_t = r_t + γ·V(s_{t+1}) − V(s_t): a one-step estimate of the advantage of token t,
        # biased by V's error; λ mixes in longer, less biased but noisier, estimates.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    returns = advantages + values
    return advantages, returns


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, per token: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old.

    Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7 (negated: a loss to minimise).
    Where the clip is active the loss is constant in π, so the token gives no gradient.
    Shapes: logprobs, old_logprobs, mask (B, T), advantages (B, T) or (B,) (one per sequence) ->
    per-token loss (B, T), 0 on padding. Metrics: clipfrac (share of tokens clipped), approx_kl
    (½·(log ρ)², the k2 estimator of KL(π_old ‖ π)), ratio.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = torch.where(mask.bool(), torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss, per token: ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε).

    Not in the PPO paper; from OpenAI baselines' ppo2 and lm-human-preferences (cliprange_value 0.2),
    kept by InstructGPT-style RLHF. Shapes: (B, T) -> per-token loss (B, T), 0 on padding.
    """
    old_values = old_values.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * torch.where(mask.bool(), torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    metrics = {
        "value_clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "value_mean": masked_mean(values, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------
# Critic-free online RL: GRPO, RLOO, REINFORCE++. Rewards (G·N,) are laid out group by group: the N
# samples of prompt 0, then the N of prompt 1, ...
# ---------------------------------------------------------------------------------------------------


def group_normalized_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO outcome advantages: Â_i = (r_i − mean(r_group)) / (std(r_group) + eps), for every token.

    Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300, sec. 4.1.2. std is unbiased and
    eps = 1e-4, as in TRL. A group whose rewards are all equal carries no signal and gets exactly 0.
    Shapes: (G·N,) -> (G·N,).
    """
    grouped = rewards.view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(rewards)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = (grouped - mean) / (std + eps)
    # mean() of equal floats can be off by an ulp; force the documented exact zero.
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(advantages), advantages).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: Â_i = R_i − mean_{j≠i} R_j, the leave-one-out baseline of the other N − 1 samples.

    Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740 (Kool et al. 2019's estimator). Unbiased,
    since the baseline does not depend on sample i. Shapes: (G·N,) -> (G·N,), N ≥ 2.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s ≥ t} γ^(s−t)·r_s within each response. Shapes: (B, T) right-padded -> (B, T)."""
    # GAE with V = 0 and λ = 1 is exactly the discounted return.
    _, returns = gae_advantages(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return returns


def reinforce_pp_advantages(
    returns: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, all_sum: AllSum | None = None
) -> torch.Tensor:
    """REINFORCE++: per-token returns (KL-penalised rewards, see `kl_penalty_rewards` and
    `discounted_returns`) normalised over the whole batch: (G − mean) / std.

    Hu 2025, https://arxiv.org/abs/2501.03262. A global baseline instead of a per-prompt one avoids
    overfitting the baseline to a prompt's few samples; "the whole batch" is the global batch across
    processes when `all_sum` is given. Shapes: (B, T) -> (B, T), 0 on padding.
    """
    return masked_whiten(returns, mask, shift_mean=True, eps=eps, all_sum=all_sum)


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO per-token loss: PPO clipped surrogate + β·k3 KL to the reference, in the loss rather than
    in the reward.

        loss_t = max(−Â·ρ_t, −Â·clip(ρ_t, 1 ± ε)) + β·(π_ref/π − log(π_ref/π) − 1)

    Shao et al. 2024, https://arxiv.org/abs/2402.03300, eq. 3 (ε = 0.2, β = 0.04) with the estimator of
    eq. 4. The paper averages tokens per sequence, then sequences (`aggregate(..., "seq-mean")`);
    "token-mean" (DAPO, Yu et al. 2025) weighs every token equally, so tokens of long responses are
    not down-weighted.
    Shapes: logprobs, old_logprobs, ref_logprobs, mask (B, T), advantages (B,) or (B, T) ->
    per-token loss (B, T), 0 on padding.
    """
    loss, metrics = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    kl = kl_k3(logprobs, ref_logprobs.detach())
    loss = loss + beta * torch.where(mask.bool(), kl, torch.zeros_like(kl))
    metrics["kl"] = masked_mean(kl, mask).detach()
    return loss, metrics
