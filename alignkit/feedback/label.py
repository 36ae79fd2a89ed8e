"""``alignkit label``: an AI judge turns prompts with several responses into preference pairs with soft labels.

Input (``--data``), one prompt per record: the ranked shape ``{prompt, responses: [...]}`` that ``alignkit bon``
writes to bon.jsonl (any ``scores`` are ignored: the judge decides), or a pair ``{prompt, chosen, rejected}``.
Pairs of a prompt with K responses (``--pairs``): ``adjacent`` (response i vs i+1, K−1 pairs: each response in at
most two comparisons) or ``all`` (every i < j, K(K−1)/2 pairs). Identical responses are not compared.

Output (``--output-dir``):
- ``pairs.jsonl``: {prompt, chosen, rejected, label, judge: {...}}, oriented so that ``chosen`` is the response the
  judge prefers and ``label`` = P(chosen preferred) in [0.5, 1] (debiased over both orders). ``alignkit rm`` reads
  ``label`` as a soft label (loss −p·log σ(Δ) − (1−p)·log σ(−Δ); RLAIF found soft labels better than hard ones);
  ``alignkit dpo`` reads the pairs (its ``--label-smoothing`` is one global ε, not the per-pair label).
  ``judge`` holds the judge's id, the principle, P(chosen preferred) with chosen shown first and second, whether
  the verdict survived the swap, and the rationales with ``--cot``.
- ``summary.json`` (also printed): position consistency (the same response wins in both orders), the rate at which
  the first-shown response wins, length bias (Pearson correlation between p − ½ and the word-count difference,
  and how often the longer response wins), and with ``--ground-truth SPEC`` (any reward source) the agreement of
  the debiased labels and of the single-order (A-first) labels with it.
- ``judge_cache.sqlite`` (or ``--cache``): every judge answer, so a killed run resumes without asking again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.config import DataConfig, arg, checked
from alignkit.data import DataError, load_records
from alignkit.feedback.cache import JudgeCache
from alignkit.feedback.judges import DEFAULT_PRINCIPLE, PREAMBLE, EnsembleJudge, Verdict, load_judge
from alignkit.rewards.base import prompt_text

PAIR_RULES = ("adjacent", "all")


@dataclass
class LabelConfig:
    data: DataConfig = field(default_factory=DataConfig)
    judge: str = arg("local:smollm2-135m", "judge: local[:MODEL] | http://HOST/v1|MODEL | reward:SPEC | module:function")
    principle: str = arg(DEFAULT_PRINCIPLE, "the question the judge answers about the two responses")
    preamble: str = arg(PREAMBLE, "LM judges: the instructions before the principle and the two responses")
    ensemble: str = arg("", "average over every principle of a constitution: 'default' or a YAML file; empty: off")
    cot: bool = arg(False, "chain of thought: the judge writes a rationale, then answers")
    cot_tokens: int = arg(64, "longest rationale in tokens (with --cot)")
    pairs: str = arg("adjacent", "pairs of K responses: adjacent (i vs i+1) | all (every i < j)")
    min_label: float = arg(0.5, "keep only pairs whose label (P(chosen preferred)) is at least this")
    labels: str = arg("soft", "soft: label = P(chosen preferred); hard: label 1 for the judge's winner, ties (P = ½) "
                              "dropped (RLAIF compares both; hard labels are what a human annotator gives)",
                      choices=("soft", "hard"))
    ground_truth: str = arg("", "a reward spec (e.g. vader) to measure the judge's agreement with; empty: none")
    output_dir: str = arg("runs/label", "pairs.jsonl, summary.json and the judge cache go here")
    cache: str = arg("", "judge cache (sqlite); empty: OUTPUT_DIR/judge_cache.sqlite")
    batch_size: int = arg(16, "shown comparisons per judge forward (local) or per cache commit")
    max_prompts: int = arg(0, "label only the first N prompts; 0: all")
    http_mode: str = arg("completions", "HTTP judge: completions (rendered text) | chat (server's template)")
    concurrency: int = arg(8, "HTTP judge: requests in flight")
    timeout: float = arg(120.0, "HTTP judge: seconds per request before a retry")
    retries: int = arg(4, "HTTP judge: retries of a failed request (back-off 0.5 s x 2^k)")
    api_key_env: str = arg("ALIGNKIT_API_KEY", "HTTP judge: environment variable holding the API key")


@dataclass
class Candidates:
    prompt: Any  # string or message list, as in the data
    responses: list[Any]  # strings or message lists, as in the data
    where: str


def _text(value: Any) -> str:
    return value if isinstance(value, str) else prompt_text(value)


def _valid_text(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value))


def read_candidates(source: str, skip_invalid: bool = False) -> list[Candidates]:
    """Prompts with >= 2 responses each, from the ranked or the pair shape; one-line errors name file:line."""
    out, skipped = [], 0
    for record in load_records(source):
        data = record.data
        try:
            if "prompt" not in data or not _valid_text(data["prompt"]):
                raise DataError(f"{record.where}: field 'prompt': expected non-empty text or messages")
            if "responses" in data:
                responses = data["responses"]
                if not isinstance(responses, list) or len(responses) < 2:
                    raise DataError(f"{record.where}: field 'responses': expected a list of at least 2 responses")
                names = [f"responses[{i}]" for i in range(len(responses))]
            elif "chosen" in data and "rejected" in data:
                responses, names = [data["chosen"], data["rejected"]], ["chosen", "rejected"]
            else:
                raise DataError(f"{record.where}: expected 'responses' (a list) or 'chosen' and 'rejected'")
            for name, response in zip(names, responses, strict=True):
                if not _valid_text(response):
                    raise DataError(f"{record.where}: field {name!r}: expected non-empty text or messages")
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        out.append(Candidates(data["prompt"], list(responses), record.where))
    if skipped:
        print(f"alignkit: {source}: skipped {skipped} invalid records", file=sys.stderr)
    if not out:
        raise DataError(f"{source}: no prompts with two or more responses")
    return out


def pair_indices(k: int, rule: str) -> list[tuple[int, int]]:
    if rule == "adjacent":
        return [(i, i + 1) for i in range(k - 1)]
    if rule == "all":
        return [(i, j) for i in range(k) for j in range(i + 1, k)]
    raise DataError(f"--pairs must be one of {', '.join(PAIR_RULES)}, got {rule!r}")


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None when a side is constant (undefined)."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def judge_report(verdicts: list[Verdict], texts_a: list[str], texts_b: list[str],
                 truth: list[float] | None = None) -> dict[str, Any]:
    """Position consistency, first-position win rate, length bias and (with ``truth``: r_a − r_b per pair)
    agreement of the debiased and of the single-order labels with the ground truth."""
    n = len(verdicts)
    # P(first shown wins) in order AB is p_ab; in order BA the first shown is B, which wins with 1 − p_ba
    first_wins = sum((v.p_ab > 0.5) + (1 - v.p_ba > 0.5) for v in verdicts) / (2 * n)
    diff = [len(a.split()) - len(b.split()) for a, b in zip(texts_a, texts_b, strict=True)]
    unequal = [(v, d) for v, d in zip(verdicts, diff, strict=True) if d != 0 and v.p_a != 0.5]
    report: dict[str, Any] = {
        "pairs": n,
        "position_consistency": sum(v.consistent for v in verdicts) / n,
        "first_position_wins": first_wins,
        "mean_confidence": sum(max(v.p_a, 1 - v.p_a) for v in verdicts) / n,
        "length_bias": {
            "corr_p_vs_word_diff": pearson([v.p_a - 0.5 for v in verdicts], [float(d) for d in diff]),
            "longer_wins": (sum((v.p_a > 0.5) == (d > 0) for v, d in unequal) / len(unequal)) if unequal else None,
            "pairs_of_unequal_length": len(unequal),
        },
    }
    if truth is not None:
        decided = [(v, t) for v, t in zip(verdicts, truth, strict=True) if t != 0]
        m = len(decided)
        report["ground_truth"] = {
            "pairs_with_a_winner": m,
            "agreement": sum((v.p_a > 0.5) == (t > 0) for v, t in decided) / m if m else None,
            "agreement_single_order": sum((v.p_ab > 0.5) == (t > 0) for v, t in decided) / m if m else None,
            "agreement_consistent_pairs": _rate([(v.p_a > 0.5) == (t > 0) for v, t in decided if v.consistent]),
            "consistent_pairs": sum(v.consistent for v, _ in decided),
        }
    return report


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """All rows or nothing: a temporary file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_judge(cfg: LabelConfig, cache: JudgeCache | None):
    if not 0.5 <= cfg.min_label <= 1.0:
        raise DataError(f"--min-label must be in [0.5, 1], got {cfg.min_label}")
    http = dict(mode=cfg.http_mode, concurrency=cfg.concurrency, timeout=cfg.timeout, api_key_env=cfg.api_key_env,
                retries=cfg.retries)
    judge = load_judge(cfg.judge, cfg.principle, cache, cfg.batch_size, cfg.cot, cfg.cot_tokens, cfg.preamble,
                       **(http if cfg.judge.startswith(("http://", "https://")) else {}))
    if cfg.ensemble:
        from alignkit.feedback.constitution import load_constitution

        judge = EnsembleJudge(judge, [p.principle for p in load_constitution(cfg.ensemble)])
    return judge


@checked
def label(cfg: LabelConfig) -> Path:
    """Label every pair, write OUT/pairs.jsonl and OUT/summary.json; return the pairs path."""
    if not cfg.data.data:
        raise DataError("label needs --data: prompts with two or more responses (e.g. a bon.jsonl)")
    candidates = read_candidates(cfg.data.data, cfg.data.skip_invalid)
    if cfg.max_prompts:
        candidates = candidates[: cfg.max_prompts]
    pair_indices(2, cfg.pairs)  # validate the flag before any work
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = JudgeCache(cfg.cache or out_dir / "judge_cache.sqlite")
    judge = make_judge(cfg, cache)

    prompts, a, b, skipped_identical = [], [], [], 0
    for c in candidates:
        for i, j in pair_indices(len(c.responses), cfg.pairs):
            if _text(c.responses[i]).strip() == _text(c.responses[j]).strip():
                skipped_identical += 1
                continue
            prompts.append(c.prompt)
            a.append(c.responses[i])
            b.append(c.responses[j])
    if not prompts:
        raise DataError(f"{cfg.data.data}: every pair has two identical responses; nothing to label")
    texts_a, texts_b = [_text(x) for x in a], [_text(x) for x in b]
    print(f"label: {len(prompts)} pairs from {len(candidates)} prompts, judge {judge.name}", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        print(f"label: {done}/{total} judge calls", file=sys.stderr, flush=True)

    from alignkit.serve.client import RequestError, ServerError

    try:
        verdicts = judge.compare(prompts, texts_a, texts_b, progress=progress)
    except (RequestError, ServerError) as error:  # answers so far are in the cache; a rerun resumes
        raise DataError(f"--judge {cfg.judge}: {error}") from None
    rows, dropped = [], 0
    for prompt, x, y, v in zip(prompts, a, b, verdicts, strict=True):
        first_is_chosen = v.p_a >= 0.5
        chosen, rejected = (x, y) if first_is_chosen else (y, x)
        p = v.p_a if first_is_chosen else 1 - v.p_a
        if p < cfg.min_label or (cfg.labels == "hard" and p == 0.5):
            dropped += 1
            continue
        meta = {"name": v.judge, "principle": v.principle,
                # P(chosen preferred) with chosen shown first, and with chosen shown second
                "p_chosen_first": v.p_ab if first_is_chosen else 1 - v.p_ba,
                "p_chosen_second": v.p_ba if first_is_chosen else 1 - v.p_ab,
                "consistent": v.consistent, "p": p}
        if cfg.cot:  # rationale with chosen shown first, then with chosen shown second
            meta["rationales"] = [v.rationale, v.rationale_ba] if first_is_chosen else [v.rationale_ba, v.rationale]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "label": 1.0 if cfg.labels == "hard" else p, "judge": meta})

    truth = None
    if cfg.ground_truth:
        from alignkit.rewards import load_reward

        reward = load_reward(cfg.ground_truth)
        scores = reward([prompt_text(p) if isinstance(p, list) else p for p in prompts] * 2, texts_a + texts_b).tolist()
        truth = [ra - rb for ra, rb in zip(scores[: len(prompts)], scores[len(prompts) :], strict=True)]
    summary = {"judge": judge.name, "principle": cfg.principle if not cfg.ensemble else f"ensemble:{cfg.ensemble}",
               "prompts": len(candidates), "pairs_written": len(rows), "labels": cfg.labels, "dropped_below_min_label": dropped,
               "skipped_identical": skipped_identical, "judge_calls": getattr(judge, "calls", None) or
               getattr(getattr(judge, "judge", None), "calls", None),
               **judge_report(verdicts, texts_a, texts_b, truth)}
    if cfg.ground_truth:
        summary["ground_truth"]["spec"] = cfg.ground_truth
    pairs_path = out_dir / "pairs.jsonl"
    write_jsonl_atomic(pairs_path, rows)
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    cache.close()
    print(json.dumps(summary, indent=2))
    print(f"wrote {len(rows)} labelled pairs to {pairs_path}")
    return pairs_path
