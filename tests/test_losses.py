"""Tests for alignkit.losses: hand-computed values, TRL 1.16 parity, estimator properties, gradients.

Handy constants used below: softplus(x) = log(1 + e^x) = −log σ(−x), and −log σ(−x) = −log σ(x) + x.
  softplus(−1) = 0.3132617, softplus(1) = 1.3132617, softplus(−2) = 0.1269280,
  softplus(−0.5) = 0.4740770, softplus(−1.5) = 0.2014133, σ(1) = 0.7310586, σ(−1) = 0.2689414.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignkit import losses as L

SP_M1 = math.log1p(math.exp(-1.0))  # 0.3132617


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual).float(), expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------
# Masked reductions and SFT
# ---------------------------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("-inf"), 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_even_if_nan():
    """Kept entries are 1, 2, 4: sum 7, mean 7/3; per row: [1.5, 4]. NaN/-inf in padding must not leak."""
    close(L.masked_sum(VALUES, MASK), 7.0)
    close(L.masked_mean(VALUES, MASK), 7.0 / 3)
    close(L.masked_mean(VALUES, MASK, dim=-1), [1.5, 4.0])
    close(L.masked_mean(VALUES, torch.zeros_like(MASK)), 0.0)


def test_masked_whiten():
    """Entries 1, 2, 4: mean 7/3, unbiased var = (16/9 + 1/9 + 25/9) / 2 = 7/3.
    Whitened: (x − 7/3) / sqrt(7/3) = [−0.8728716, −0.2182179, 1.0910895], padding 0."""
    w = L.masked_whiten(VALUES, MASK)
    s = math.sqrt(7 / 3)
    close(w, [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]], tol=1e-5)
    unshifted = L.masked_whiten(VALUES, MASK, shift_mean=False)
    close(L.masked_mean(unshifted, MASK), 7 / 3, tol=1e-5)
    close(L.masked_var(unshifted, MASK), 1.0, tol=1e-5)


def test_aggregate_token_vs_seq_mean():
    """loss [[1,2,3],[4,5,6]], mask [[1,1,1],[1,0,0]]: token-mean (1+2+3+4)/4 = 2.5;
    seq-mean mean(2, 4) = 3."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(L.aggregate(loss, mask, "token-mean"), 2.5)
    close(L.aggregate(loss, mask, "seq-mean"), 3.0)


def test_sft_loss():
    """logps [[-1,-2],[-3,x]] with the last token masked: NLL per token [[1,2],[3,0]], token mean 2."""
    loss, m = L.sft_loss(torch.tensor([[-1.0, -2.0], [-3.0, -9.0]]), torch.tensor([[1, 1], [1, 0]]))
    close(loss, [[1.0, 2.0], [3.0, 0.0]])
    close(m["nll"], 2.0)


# ---------------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    """r_w = 2, r_l = 1: Δ = 1 -> softplus(−1) = 0.3132617.
    margin 0.5: Δ = 0.5 -> softplus(−0.5) = 0.4740770.
    soft label p = 0.8: 0.8·softplus(−1) + 0.2·softplus(1) = softplus(−1) + 0.2 = 0.5132617.
    Second pair r_w = 0, r_l = 1 is misordered: accuracy 1/2, mean margin (1 − 1)/2 = 0."""
    rw, rl = t(2.0, 0.0), t(1.0, 1.0)
    losses, m = L.bradley_terry_loss(rw, rl)
    close(losses, [SP_M1, math.log1p(math.e)])
    close(m["accuracy"], 0.5)
    close(m["margin"], 0.0)
    losses, _ = L.bradley_terry_loss(t(2.0), t(1.0), margin=t(0.5))
    close(losses, [math.log1p(math.exp(-0.5))])
    losses, m = L.bradley_terry_loss(t(2.0), t(1.0), soft_label=t(0.8))
    close(losses, [SP_M1 + 0.2])
    close(m["accuracy"], 1.0)
    close(L.reward_centering_loss(t(2.0), t(1.0), coef=0.01), [0.09])


def test_bradley_terry_gradient_separates_pair():
    """d/dr_w [−log σ(r_w − r_l)] = −σ(−Δ) = −0.2689414 at Δ = 1; r_l gets the opposite."""
    rw, rl = t(2.0).requires_grad_(), t(1.0).requires_grad_()
    L.bradley_terry_loss(rw, rl)[0].sum().backward()
    close(rw.grad, [-0.2689414])
    close(rl.grad, [0.2689414])


def test_ranking_pairs():
    """Scores [0.1, 0.5, 0.3]: better-than pairs (1,0), (1,2), (2,0) = C(3,2); ties give no pair."""
    better, worse = L.ranking_pairs(t(0.1, 0.5, 0.3))
    assert sorted(zip(better.tolist(), worse.tolist())) == [(1, 0), (1, 2), (2, 0)]
    better, worse = L.ranking_pairs(t(1.0, 1.0, 0.0))
    assert sorted(zip(better.tolist(), worse.tolist())) == [(0, 2), (1, 2)]
    assert len(L.ranking_pairs(torch.arange(5.0))[0]) == 10


def test_ranked_bradley_terry_loss_by_hand():
    """K = 3, rewards [3, 1, 2] ordered like the scores: pair margins 2, 1, 1 ->
    (softplus(−2) + 2·softplus(−1)) / 3 = (0.1269280 + 0.6265234) / 3 = 0.2511505.
    Row 2 has response 3 missing: one pair (0 over 1) with margin −1 -> softplus(1) = 1.3132617."""
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 50.0]])
    scores = torch.tensor([[3.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    losses, m = L.ranked_bradley_terry_loss(rewards, scores, mask)
    close(losses, [(math.log1p(math.exp(-2)) + 2 * SP_M1) / 3, math.log1p(math.e)], tol=1e-5)
    close(m["accuracy"], 3 / 4)
    close(m["pairs"], 2.0)


# ---------------------------------------------------------------------------------------------------
# DPO family, by hand
# ---------------------------------------------------------------------------------------------------

# π(y_w) = −1, π(y_l) = −3, π_ref = −2 for both: h = (−1 + 2) − (−3 + 2) = 2.
DPO_IN = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_dpo_sigmoid_by_hand():
    """β = 0.5, h = 2: β·h = 1 -> loss softplus(−1) = 0.3132617; rewards 0.5·1 and 0.5·(−1)."""
    losses, m = L.dpo_loss(*DPO_IN, beta=0.5)
    close(losses, [SP_M1])
    close(m["rewards/chosen"], 0.5)
    close(m["rewards/rejected"], -0.5)
    close(m["rewards/margins"], 1.0)
    close(m["rewards/accuracies"], 1.0)
    close(m["logps/chosen"], -1.0)
    close(m["logps/rejected"], -3.0)
    assert all(not v.requires_grad for v in m.values())


def test_cdpo_label_smoothing_by_hand():
    """cDPO with ε = 0.1, x = β·h = 1: 0.9·softplus(−1) + 0.1·softplus(1) = softplus(−1) + 0.1·x
    = 0.4132617."""
    losses, _ = L.dpo_loss(*DPO_IN, beta=0.5, label_smoothing=0.1)
    close(losses, [SP_M1 + 0.1])


def test_ipo_hinge_robust_by_hand():
    """h = 2.
    IPO β = 0.5: (2 − 1)² = 1; β = 0.25: (2 − 2)² = 0.
    hinge β = 0.5: relu(1 − 1) = 0; β = 0.1: relu(1 − 0.2) = 0.8.
    robust ε = 0.1, x = 1: (0.9·softplus(−1) − 0.1·softplus(1)) / 0.8 = softplus(−1) − 0.1/0.8
    = 0.1882617; ε = 0 is plain DPO."""
    close(L.dpo_loss(*DPO_IN, beta=0.5, loss_type="ipo")[0], [1.0])
    close(L.dpo_loss(*DPO_IN, beta=0.25, loss_type="ipo")[0], [0.0])
    close(L.dpo_loss(*DPO_IN, beta=0.5, loss_type="hinge")[0], [0.0])
    close(L.dpo_loss(*DPO_IN, beta=0.1, loss_type="hinge")[0], [0.8])
    close(L.dpo_loss(*DPO_IN, beta=0.5, loss_type="robust", label_smoothing=0.1)[0], [SP_M1 - 0.125])
    close(L.dpo_loss(*DPO_IN, beta=0.5, loss_type="robust")[0], [SP_M1])


def test_dpo_rejects_bad_settings():
    with pytest.raises(ValueError):
        L.dpo_loss(*DPO_IN, loss_type="nope")
    with pytest.raises(ValueError):
        L.dpo_loss(*DPO_IN, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        L.dpo_loss(*DPO_IN, loss_type="robust", label_smoothing=0.5)
    assert set(L.DPO_LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    """dL/dlogπ(y_w) = −β·σ(−β·h) = −0.5·σ(−1) = −0.1344707, and +0.1344707 for y_l; the reference
    gets no gradient when it is a constant. A gradient step on the loss raises h."""
    pc, pr = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
    losses, _ = L.dpo_sigmoid(pc, pr, t(-2.0), t(-2.0), beta=0.5)
    losses.sum().backward()
    close(pc.grad, [-0.5 * 0.2689414])
    close(pr.grad, [0.5 * 0.2689414])
    for loss_type in ["sigmoid", "ipo", "hinge", "robust"]:
        pc, pr = t(-1.0).requires_grad_(), t(-3.0).requires_grad_()
        eps = 0.1 if loss_type == "robust" else 0.0
        losses, _ = L.dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.1, loss_type=loss_type, label_smoothing=eps)
        losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss_type


def test_simpo_by_hand():
    """log π(y_w) = −6 over 3 tokens (avg −2), log π(y_l) = −12 over 4 tokens (avg −3), β = 2, γ = 0.5:
    z = 2·(−2) − 2·(−3) − 0.5 = 1.5 -> softplus(−1.5) = 0.2014133; with ε = 0.1: + 0.1·1.5."""
    args = (t(-6.0), t(-12.0), torch.tensor([3]), torch.tensor([4]))
    losses, m = L.simpo_loss(*args, beta=2.0, gamma=0.5)
    close(losses, [math.log1p(math.exp(-1.5))])
    close(m["rewards/chosen"], -4.0)
    close(m["rewards/rejected"], -6.0)
    close(m["logps/chosen"], -2.0)
    losses, _ = L.simpo_loss(*args, beta=2.0, gamma=0.5, label_smoothing=0.1)
    close(losses, [math.log1p(math.exp(-1.5)) + 0.15])


def test_orpo_by_hand():
    """P(y_w) = 0.5 -> odds 1, log odds 0; P(y_l) = 0.2 -> odds 0.25. Log odds ratio log 4 = 1.3862944,
    −log σ(log 4) = log(1 + 1/4) = 0.2231436. NLL 2, λ = 0.1 -> 2.0223144."""
    losses, m = L.orpo_loss(t(math.log(0.5)), t(math.log(0.2)), t(2.0), lambda_=0.1)
    close(losses, [2.0 + 0.1 * math.log(1.25)])
    close(m["log_odds_ratio"], math.log(4.0))
    close(m["odds_ratio_loss"], math.log(1.25))


def test_orpo_log1mexp_is_stable_at_both_ends():
    """log(1 − e^x) against float64 at x = −1e-5 (cancellation in 1 − e^x) and x = −30 (e^x underflows
    next to 1). Also finite with a finite gradient at x = 0 (p = 1)."""
    x = t(-1e-5, -0.5, -0.7, -3.0, -30.0)
    expected = torch.log(-torch.expm1(x.double())).float()
    close(L._log1mexp(x), expected, tol=1e-5)
    a = t(0.0, -1.0).requires_grad_()
    loss, _ = L.orpo_loss(a[:1], a[1:], t(1.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(a.grad).all()


def test_kto_by_hand():
    """β = 1, z0 = 0.5. Desirable r = 1.5: λ_D·(1 − σ(1)) = 0.2689414.
    Undesirable r = −0.5, λ_U = 2: 2·(1 − σ(0.5 + 0.5)) = 0.5378828."""
    policy, ref = t(-1.0, -3.0), t(-2.5, -2.5)
    losses, m = L.kto_loss(policy, ref, torch.tensor([True, False]), t(0.5), beta=1.0, undesirable_weight=2.0)
    close(losses, [0.2689414, 2 * 0.2689414])
    close(m["kl"], 0.5)
    close(m["rewards/chosen"], 1.5)
    close(m["rewards/rejected"], -0.5)
    close(m["rewards/margins"], 2.0)


def test_kto_kl_estimate_is_clamped_mean_without_grad():
    """Log-ratios [0.5, −0.5] -> mean 0; [1, 0] -> 0.5; [−1, −2] -> −1.5 clamped to 0."""
    p = t(-1.0, -1.0).requires_grad_()
    z0 = L.kto_kl_estimate(p, t(-2.0, -1.0))
    close(z0, 0.5)
    assert not z0.requires_grad
    close(L.kto_kl_estimate(t(-1.0, -2.0), t(-1.5, -1.5)), 0.0)
    close(L.kto_kl_estimate(t(-3.0, -3.0), t(-2.0, -1.0)), 0.0)


def test_rrhf_by_hand():
    """Row 1: scores [1, 3, 2], p = [−1, −2, −1.5]. Pairs with r_i < r_j: (0,1): relu(−1 + 2) = 1,
    (0,2): relu(−1 + 1.5) = 0.5, (2,1): relu(−1.5 + 2) = 0.5 -> 2; p disagrees on all 3.
    Row 2: response 3 missing; scores [1, 2], p = [−3, −2]: pair (0,1): relu(−1) = 0, agrees.
    Losses [2 + 0.7, 0 + 0.3]; rank agreement 1/4; best responses 1 and 1 (the missing 9 is ignored)."""
    avg_logps = torch.tensor([[-1.0, -2.0, -1.5], [-3.0, -2.0, -1.0]])
    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    losses, m = L.rrhf_loss(avg_logps, scores, t(0.7, 0.3), mask)
    close(losses, [2.7, 0.3])
    close(m["rank_agreement"], 0.25)
    assert L.rrhf_best_index(scores, mask).tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------


def test_kl_estimators_against_exact_kl():
    """π = [0.5, 0.3, 0.2], π_ref = [0.2, 0.5, 0.3]; KL(π‖π_ref) = Σ π log(π/π_ref) = 0.1946. Exact
    expectations over π: E[k1] = E[k3] = KL (unbiased), E[k2] ≠ KL (biased). Per sample k2, k3 ≥ 0 while
    k1 < 0 where π < π_ref. Monte Carlo: the mean of k3 over 200k samples is within 4 standard errors."""
    pi, ref = t(0.5, 0.3, 0.2, dtype=torch.float64), t(0.2, 0.5, 0.3, dtype=torch.float64)
    lp, lr = pi.log(), ref.log()
    exact = (pi * (lp - lr)).sum()
    close((pi * L.kl_k1(lp, lr)).sum(), exact)
    close((pi * L.kl_k3(lp, lr)).sum(), exact)
    assert abs((pi * L.kl_k2(lp, lr)).sum() - exact) > 1e-3
    assert (L.kl_k2(lp, lr) >= 0).all() and (L.kl_k3(lp, lr) >= 0).all() and (L.kl_k1(lp, lr) < 0).any()
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    k3 = L.kl_k3(lp[idx], lr[idx])
    assert abs(k3.mean() - exact) < 4 * k3.std() / math.sqrt(len(k3))
    # k3 has lower variance than k1 here, which is why GRPO uses it.
    assert k3.var() < L.kl_k1(lp[idx], lr[idx]).var()


# ---------------------------------------------------------------------------------------------------
# PPO pieces
# ---------------------------------------------------------------------------------------------------


def test_gae_three_tokens_by_hand():
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 0.9, λ = 0.8 (γλ = 0.72):
    δ2 = 1 − 0.7 = 0.3;  δ1 = 0.9·0.7 − 0.6 = 0.03;  δ0 = 0.9·0.6 − 0.5 = 0.04
    A2 = 0.3;  A1 = 0.03 + 0.72·0.3 = 0.246;  A0 = 0.04 + 0.72·0.246 = 0.21712
    returns = A + V = [0.71712, 0.846, 1.0].
    Row 2 is the same response right-padded with junk (V = 9, r = 5) that must be ignored."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0], [0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    adv, ret = L.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3, 0.0]] * 2)
    close(ret[:, :3], [[0.71712, 0.846, 1.0]] * 2)


def test_gae_with_unit_gamma_lambda_is_monte_carlo():
    """γ = λ = 1: A_t = Σ_{s≥t} r_s − V_t, so returns are reward-to-go [1, 1, 1]."""
    adv, ret = L.gae_advantages(t(0.0, 0.0, 1.0)[None], t(0.5, 0.6, 0.7)[None], torch.ones(1, 3), 1.0, 1.0)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])
    close(L.discounted_returns(t(1.0, 1.0, 1.0)[None], torch.ones(1, 3), gamma=0.5), [[1.75, 1.5, 1.0]])


def test_kl_penalty_rewards_by_hand():
    """log π − log π_ref = [0.5, 0, −1, (pad)], β = 0.1, score 2 at the last real token (index 2):
    rewards [−0.05, 0, 0.1 + 2, 0]; sequence KL −0.5."""
    rewards, m = L.kl_penalty_rewards(
        t(2.0), t(-1.0, -1.0, -2.0, 0.0)[None], t(-1.5, -1.0, -1.0, -7.0)[None], t(1, 1, 1, 0)[None], 0.1
    )
    close(rewards, [[-0.05, 0.0, 2.1, 0.0]])
    close(m["kl"], -0.5)
    close(m["score"], 2.0)


def test_adaptive_kl_coef_by_hand():
    """β = 0.1, target 6. KL 12: error clip(1) = 0.2 -> 0.1·(1 + 0.1·0.2) = 0.102.
    KL 5.7: error −0.05 -> 0.1·(1 − 0.005) = 0.0995. KL 0: error clip(−1) = −0.2 -> 0.098."""
    assert L.adaptive_kl_coef(0.1, 12.0, 6.0) == pytest.approx(0.102)
    assert L.adaptive_kl_coef(0.1, 5.7, 6.0) == pytest.approx(0.0995)
    assert L.adaptive_kl_coef(0.1, 0.0, 6.0) == pytest.approx(0.098)
    assert L.adaptive_kl_coef(0.1, 12.0, 6.0, k_beta=256 / 10_000) == pytest.approx(0.1 * (1 + 0.0256 * 0.2))


def test_ppo_policy_loss_clipping_and_gradients():
    """ε = 0.2, four tokens (ratio ρ, advantage A):
    (1.5, +1): clipped at 1.2 -> loss −1.2, no gradient.      (0.5, +1): unclipped -> −0.5, grad −A·ρ = −0.5.
    (0.5, −1): clipped at 0.8 -> loss 0.8, no gradient.       (1.5, −1): unclipped -> 1.5, grad −A·ρ = 1.5.
    clipfrac 2/4; approx_kl = mean ½(log ρ)²."""
    ratios = t(1.5, 0.5, 0.5, 1.5)
    old = torch.zeros(1, 4)
    logp = ratios.log()[None].clone().requires_grad_()
    adv = t(1.0, 1.0, -1.0, -1.0)[None]
    loss, m = L.ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_eps=0.2)
    close(loss, [[-1.2, -0.5, 0.8, 1.5]])
    loss.sum().backward()
    close(logp.grad, [[0.0, -0.5, 0.0, 1.5]])
    close(m["clipfrac"], 0.5)
    close(m["approx_kl"], (0.5 * ratios.log() ** 2).mean())


def test_ppo_value_loss_by_hand():
    """ε = 0.2. Token 0: V = 1, V_old = 0.5, R = 2: V_clip = 0.7; max(1, 1.69)/2 = 0.845, and the clipped
    branch wins so V gets no gradient. Token 1: V = 1, V_old = 0.9, R = 0: V_clip = 1; 1/2 = 0.5, grad V − R = 1."""
    v = t(1.0, 1.0)[None].clone().requires_grad_()
    loss, m = L.ppo_value_loss(v, t(0.5, 0.9)[None], t(2.0, 0.0)[None], torch.ones(1, 2), clip_eps=0.2)
    close(loss, [[0.845, 0.5]])
    loss.sum().backward()
    close(v.grad, [[0.0, 1.0]])
    close(m["value_clipfrac"], 0.5)


# ---------------------------------------------------------------------------------------------------
# Critic-free RL
# ---------------------------------------------------------------------------------------------------


def test_group_normalized_advantages():
    """Group [1, 2, 3]: mean 2, unbiased std 1 -> [−1, 0, 1] / (1 + 1e-4).
    Groups [5, 5, 5] and [0.1, 0.1, 0.1] have equal rewards -> exactly 0."""
    adv = L.group_normalized_advantages(t(1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1), group_size=3)
    close(adv[:3], [-1 / 1.0001, 0.0, 1 / 1.0001])
    assert torch.equal(adv[3:], torch.zeros(6))


def test_rloo_advantages_by_hand():
    """[1, 2, 3, 6]: leave-one-out baselines (12 − r_i)/3 = [11/3, 10/3, 3, 2] ->
    advantages [−8/3, −4/3, 0, 4]; they sum to 0 within each group."""
    adv = L.rloo_advantages(t(1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0), group_size=4)
    close(adv[:4], [-8 / 3, -4 / 3, 0.0, 4.0], tol=1e-5)
    close(adv[4:], [-2 / 3, 2 / 3, -2 / 3, 2 / 3], tol=1e-5)
    with pytest.raises(ValueError):
        L.rloo_advantages(t(1.0, 2.0), group_size=1)


def test_reinforce_pp_advantages_are_batch_whitened():
    """Returns [[1, 2, 3], [4, pad, pad]]: over the 4 real tokens the result has mean 0 and unbiased
    std 1; padding stays 0."""
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = L.reinforce_pp_advantages(returns, mask)
    close(L.masked_mean(adv, mask), 0.0, tol=1e-6)
    close(L.masked_var(adv, mask), 1.0, tol=1e-5)
    close(adv[1, 1:], [0.0, 0.0])


def test_grpo_policy_loss_by_hand():
    """On-policy (ρ = 1), Â = 1, π = 0.5, π_ref = 0.25, β = 0.04:
    k3 = 0.5 − 1 − log 0.5 = 0.1931472; loss = −1 + 0.04·0.1931472 = −0.9922741.
    Gradient w.r.t. log π: −Â·ρ + β·(1 − π_ref/π) = −1 + 0.04·0.5 = −0.98. Padding contributes nothing."""
    logp = t(math.log(0.5), 0.0)[None].clone().requires_grad_()
    loss, m = L.grpo_policy_loss(
        logp, logp.detach(), t(math.log(0.25), 0.0)[None] - t(0.0, 3.0), t(1.0), t(1, 0)[None], beta=0.04
    )
    k3 = 0.5 - 1 - math.log(0.5)
    close(loss, [[-1 + 0.04 * k3, 0.0]])
    close(m["kl"], k3)
    loss.sum().backward()
    close(logp.grad, [[-0.98, 0.0]])


# ---------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 on the same random tensors. TRL computes these losses inside trainer methods;
# a stand-in `self` carries only the attributes each method reads.
# ---------------------------------------------------------------------------------------------------

ACCEL = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


class FakeLM:
    """Stands in for a causal LM with TRL's fused LM head: returns fixed per-sequence log-probs."""

    training = True

    def __init__(self, seq_logps: torch.Tensor, width: int):
        per_token = torch.zeros(len(seq_logps), width - 1)
        per_token[:, -1] = seq_logps  # TRL sums over positions, so the total is what matters
        zeros = torch.zeros_like(per_token)
        self.out = SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), logits=None
        )

    def __call__(self, **kwargs):
        return self.out


def stand_in(model, **attrs):
    base = dict(
        model=model, accelerator=ACCEL, aux_loss_enabled=False, precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    return SimpleNamespace(**base, **attrs)


def random_pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr = -torch.rand(n, generator=g) * 40 - 5, -torch.rand(n, generator=g) * 40 - 5
    rc, rr = pc + torch.randn(n, generator=g) * 3, pr + torch.randn(n, generator=g) * 3
    return pc, pr, rc, rr


def trl_dpo(pc, pr, rc, rr, loss_type, beta, label_smoothing=0.0, lengths=None):
    from trl.trainer.dpo_trainer import DPOTrainer

    n, width = len(pc), 12
    completion_mask = torch.ones(2 * n, width, dtype=torch.long)
    if lengths is not None:  # IPO divides by the completion length: mark that many tokens
        completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    model = FakeLM(torch.cat([pc, pr]), width)
    self = stand_in(
        model, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.ones(2 * n, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


DPO_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("robust", 0.1, 0.2)]
METRIC_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"]


@pytest.mark.parametrize("loss_type,beta,eps", DPO_CASES)
def test_dpo_matches_trl(loss_type, beta, eps):
    pytest.importorskip("trl")
    pc, pr, rc, rr = random_pairs()
    ours, m = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    theirs, trl_m = trl_dpo(pc, pr, rc, rr, loss_type, beta, eps)
    close(ours.mean(), theirs, tol=1e-5)
    for key in METRIC_KEYS:
        close(m[key], trl_m[key], tol=1e-5)


def test_ipo_matches_trl_with_length_averaged_logps():
    """TRL's IPO divides each log-ratio by the completion length; ours takes length-averaged log-probs."""
    pytest.importorskip("trl")
    pc, pr, rc, rr = random_pairs(seed=1)
    lengths = torch.randint(1, 12, (2 * len(pc),), generator=torch.Generator().manual_seed(1))
    lc, lr = lengths.chunk(2)
    ours, _ = L.dpo_ipo(pc / lc, pr / lr, rc / lc, rr / lr, beta=0.1)
    theirs, _ = trl_dpo(pc, pr, rc, rr, "ipo", 0.1, lengths=lengths)
    close(ours.mean(), theirs, tol=1e-5)


def cpo_stand_in(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    return SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
        accelerator=ACCEL,
    )  # fmt: skip


def test_cdpo_matches_trl_label_smoothed_sigmoid():
    """TRL 1.16's DPO "sigmoid" has no label smoothing; its CPO "sigmoid" applies the cDPO formula to
    logπ(y_w) − logπ(y_l), so feeding it the DPO log-ratios gives cDPO."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, rc, rr = random_pairs(seed=2)
    ours, _ = L.dpo_sigmoid(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_stand_in("sigmoid", 0.1, 0.2), pc - rc, pr - rr)
    close(ours, theirs, tol=1e-5)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_trl_cpo(beta, gamma, eps):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, _, _ = random_pairs(seed=3)
    lengths = torch.randint(5, 60, (2, len(pc)), generator=torch.Generator().manual_seed(3))
    ours, _ = L.simpo_loss(pc, pr, lengths[0], lengths[1], beta=beta, gamma=gamma, label_smoothing=eps)
    self = cpo_stand_in("simpo", beta, eps, simpo_gamma=gamma)
    theirs, _, _ = CPOTrainer.cpo_loss(self, pc / lengths[0], pr / lengths[1])  # TRL averages for simpo
    close(ours, theirs, tol=1e-5)


def test_orpo_matches_trl():
    """TRL: loss = NLL − mean(β·log σ(log odds ratio)); ours per example: NLL + λ·(−log σ(...))."""
    pytest.importorskip("trl")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(4)
    chosen, rejected = -torch.rand(16, generator=g) * 3, -torch.rand(16, generator=g) * 3
    chosen[0], rejected[0] = -1e-4, -0.69  # near p = 1 and around the log1mexp switch
    nll = torch.rand(16, generator=g)
    ours, m = L.orpo_loss(chosen, rejected, nll, lambda_=0.1)
    trl_losses, _, _, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=0.1, accelerator=ACCEL), chosen, rejected
    )
    close(ours, nll - trl_losses, tol=1e-5)
    close(m["log_odds_ratio"], trl_log_odds, tol=1e-5)


def test_kto_matches_trl():
    pytest.importorskip("trl")
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(5)
    n, width = 16, 10
    policy = -torch.rand(n, generator=g) * 30
    ref = policy + torch.randn(n, generator=g) * 5
    labels = torch.rand(n, generator=g) > 0.4
    kl_policy = -torch.rand(n, generator=g) * 30
    kl_ref = kl_policy - torch.rand(n, generator=g) * 2  # positive mean log-ratio: z0 > 0
    model = FakeLM(policy, width)
    self = stand_in(
        model, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.33, calculate_KL=True,
        _compute_kl_logps=lambda model, batch: kl_policy,
    )  # fmt: skip
    batch = {
        "input_ids": torch.ones(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": torch.ones(n, width, dtype=torch.long),
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    theirs = KTOTrainer._compute_loss(self, model, batch, return_outputs=False)
    z0 = L.kto_kl_estimate(kl_policy, kl_ref)
    ours, m = L.kto_loss(policy, ref, labels, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
    assert z0 > 0
    close(ours.mean(), theirs, tol=1e-5)
    trl_m = {k: v[-1] for k, v in self._metrics["train"].items()}
    for key in ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen"]:
        close(m[key], trl_m[key], tol=1e-5)


@pytest.mark.parametrize("use_margin,center", [(False, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(use_margin, center):
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(6)
    rw, rl, margin = torch.randn(16, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g)
    out = SimpleNamespace(logits=torch.cat([rw, rl])[:, None])  # TRL's batch is [chosen; rejected]

    class RewardModel:
        training = True

        def __call__(self, **kwargs):
            return out

    self = stand_in(RewardModel(), args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(32, 4, dtype=torch.long), "attention_mask": torch.ones(32, 4)}
    if use_margin:
        inputs["margin"] = margin
    theirs = RewardTrainer.compute_loss(self, self.model, inputs)
    ours, m = L.bradley_terry_loss(rw, rl, margin=margin if use_margin else None)
    if center is not None:
        ours = ours + L.reward_centering_loss(rw, rl, coef=center)
    close(ours.mean(), theirs, tol=1e-5)
    close(m["accuracy"], self._metrics["train"]["accuracy"][-1])
    close(m["margin"], self._metrics["train"]["margin"][-1], tol=1e-5)
