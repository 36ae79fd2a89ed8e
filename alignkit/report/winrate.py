"""Judge win rates against a baseline, raw and length-controlled.

Judges prefer longer answers, so a method can raise its win rate by writing more. AlpacaEval's length-controlled
win rate (Dubois et al. 2024, https://arxiv.org/abs/2404.04475) fits a logistic regression of the judge's verdict
on the length difference and reports the win rate it predicts when the lengths are equal. Here, with one
covariate (the length difference in words, divided by its standard deviation):

    P(win | d) = σ(θ₀ + θ₁·d),       LC win rate = σ(θ₀)          (the fit at d = 0)

fitted by maximum likelihood (scikit-learn, C = ∞: no penalty). Soft verdicts p ∈ [0, 1] enter as two weighted rows
(label 1 with weight p, label 0 with weight 1 − p), which gives exactly the soft-label log-likelihood
Σ p·log σ(z) + (1 − p)·log σ(−z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class WinRate:
    label: str
    n: int
    raw: float  # mean verdict
    raw_se: float
    length_controlled: float  # σ(θ₀)
    slope: float  # θ₁ per standard deviation of the length difference
    mean_length_diff: float  # words, candidate − baseline


def _words(text) -> int:
    return len(str(text).split())


def length_controlled(wins: list[float], length_diffs: list[float]) -> tuple[float, float]:
    """(σ(θ₀), θ₁) of the logistic regression of the (soft) verdicts on the standardised length difference."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    p = np.clip(np.asarray(wins, dtype=np.float64), 0.0, 1.0)
    d = np.asarray(length_diffs, dtype=np.float64)
    scale = d.std() or 1.0
    x = np.concatenate([d, d])[:, None] / scale
    y = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    w = np.concatenate([p, 1.0 - p])
    if w[y == 1].sum() == 0 or w[y == 0].sum() == 0:  # every verdict one way: the fit has no finite optimum
        return float(p.mean()), 0.0
    # C = ∞: no penalty, the plain maximum-likelihood fit
    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x, y, sample_weight=w)
    return 1.0 / (1.0 + math.exp(-float(fit.intercept_[0]))), float(fit.coef_[0, 0])


def win_rate(label: str, records: list[dict]) -> WinRate:
    wins = [float(r["win"]) for r in records]
    diffs = [float(r["length_diff"]) if "length_diff" in r else _words(r.get("candidate", "")) - _words(r.get("baseline", ""))
             for r in records]
    n = len(wins)
    raw = sum(wins) / n
    se = math.sqrt(sum((w - raw) ** 2 for w in wins) / max(1, n - 1) / n)
    lc, slope = length_controlled(wins, diffs)
    return WinRate(label, n, raw, se, lc, slope, sum(diffs) / n)
