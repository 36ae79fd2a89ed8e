"""``alignkit curate``: shrink a noisy SFT or preference set with an ordered pipeline of named steps.

Steps (``--steps``, in the order given; each sees only the rows the earlier ones kept):

- ``exact``: exact duplicates (normalised text hash);
- ``near``: near duplicates, MinHash + LSH (datasketch), Jaccard ≥ ``--near-threshold`` on word shingles;
- ``semantic``: SemDeDup, cosine > ``--semantic-threshold`` to a kept row of the same K-means cluster;
- ``quality``: LIMA-style rules (``--rules``, see ``curate.rules``);
- ``score``: score (prompt, response) with any reward source (``--score``), drop below ``--min-score``;
- ``select``: core-set of ``--fraction`` of the input rows or ``--count`` rows: K-means on embeddings, a
  share per cluster proportional to its size, picked by ``--pick centroid|kcenter|quality``.

Outputs in ``--output-dir`` (each written atomically, only after every step succeeded): ``curated.jsonl``
(kept records, unchanged, in input order: every trainer reads it), ``manifest.jsonl`` (one line per dropped
row: input index, source ``where``, step, rule, ``duplicate_of`` = input index of the kept row where there is
one, detail), ``summary.json`` (counts per step and rule, examples per rule, timings).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from alignkit.config import arg, checked
from alignkit.curate.rules import RULES, RuleSettings, length_counter, refusal_pattern
from alignkit.curate.select import PICKS
from alignkit.curate.text import View, view
from alignkit.data import DataError, Record, load_records

STEPS = ("exact", "near", "semantic", "quality", "score", "select")


@dataclass
class CurateConfig:
    data: str = arg("", "input data: .jsonl/.json/.parquet/.csv, a saved datasets dir, or bundled:NAME (any record shape)")
    output_dir: str = arg("", "where curated.jsonl, manifest.jsonl and summary.json are written")
    steps: str = arg("exact,near,quality", f"comma-separated steps, run in this order: {','.join(STEPS)}")
    rules: str = arg(",".join(RULES), "quality rules the quality step applies (first that fires names the drop)")
    min_length: int = arg(1, "rule length: shortest response, in --length-unit")
    max_length: int = arg(2048, "rule length: longest response, in --length-unit")
    length_unit: str = arg("words", "rule length: words, or tokens:MODEL (tokens of that model's tokenizer, e.g. tokens:smollm2-135m)")
    repetition_n: int = arg(3, "rule repetition: n of the word n-grams")
    max_repetition: float = arg(0.3, "rule repetition: largest share of repeated n-grams")
    refusal_patterns: str = arg("", "rule refusal: extra regexes (|-separated) besides the built-in refusals")
    near_threshold: float = arg(0.8, "near: Jaccard similarity of word shingles at or above which rows are duplicates")
    num_perm: int = arg(128, "near: MinHash permutations")
    shingle: int = arg(3, "near: words per shingle")
    semantic_threshold: float = arg(0.95, "semantic: cosine above which a row duplicates a kept one")
    semantic_clusters: int = arg(0, "semantic: K-means clusters; 0: ceil(sqrt(rows))")
    score: str = arg("", "score: reward source (vader, length:N, regex:P, RM dir, module:function, http://...)")
    min_score: float = arg(-math.inf, "score: drop rows scoring below this")
    fraction: float = arg(0.0, "select: keep this fraction of the input rows (e.g. 0.005)")
    count: int = arg(0, "select: keep this many rows (instead of --fraction)")
    clusters: int = arg(0, "select: K-means clusters; 0: min(budget, ceil(sqrt(rows)))")
    pick: str = arg("centroid", "select: per-cluster pick: centroid, kcenter, quality (needs the score step first), "
                                "or random (a uniform sample of the budget, no clustering: the baseline)")
    kmeans: str = arg("faiss", "K-means library: faiss or sklearn")
    embedder: str = arg("minilm", "embeddings: minilm (bundled all-MiniLM-L6-v2) or causal:MODEL (mean-pooled last hidden states)")
    embed_max_length: int = arg(256, "embeddings: tokens per text (longer texts are cut for embedding only)")
    embed_batch_size: int = arg(64, "embeddings: texts per forward pass")
    cache_dir: str = arg("", "embedding cache directory; empty: $ALIGNKIT_CACHE/embeddings")
    seed: int = arg(0, "seed for MinHash permutations and K-means")
    examples_per_rule: int = arg(3, "dropped rows shown per rule in summary.json")

    def step_list(self) -> list[str]:
        return [s.strip() for s in self.steps.split(",") if s.strip()]

    def rule_list(self) -> list[str]:
        return [r.strip() for r in self.rules.split(",") if r.strip()]


def check(cfg: CurateConfig) -> None:
    """Every flag a user can get wrong, as one line, before anything is read or written."""
    steps = cfg.step_list()
    if not cfg.data:
        raise ValueError("--data: expected an input file, directory or bundled:NAME")
    if not cfg.output_dir:
        raise ValueError("--output-dir: expected a directory for curated.jsonl, manifest.jsonl, summary.json")
    if not steps:
        raise ValueError(f"--steps: expected at least one of {', '.join(STEPS)}")
    for s in steps:
        if s not in STEPS:
            raise ValueError(f"--steps: unknown step {s!r}; expected some of {', '.join(STEPS)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"--steps: a step appears twice in {cfg.steps!r}")
    for r in cfg.rule_list():
        if r not in RULES:
            raise ValueError(f"--rules: unknown rule {r!r}; expected some of {', '.join(RULES)}")
    for name, lo, hi in (("near_threshold", 0.0, 1.0), ("semantic_threshold", -1.0, 1.0), ("max_repetition", 0.0, 1.0)):
        value = getattr(cfg, name)
        if not lo < value <= hi:
            raise ValueError(f"--{name.replace('_', '-')}: expected a number in ({lo:g}, {hi:g}], got {value}")
    for name, low in (("num_perm", 2), ("shingle", 1), ("repetition_n", 1), ("min_length", 0), ("max_length", 1),
                      ("semantic_clusters", 0), ("clusters", 0), ("count", 0), ("embed_max_length", 1),
                      ("embed_batch_size", 1), ("examples_per_rule", 0)):
        if getattr(cfg, name) < low:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.fraction <= 1.0:
        raise ValueError(f"--fraction: expected a number in (0, 1], got {cfg.fraction}")
    if cfg.fraction and cfg.count:
        raise ValueError("--fraction and --count: give one of them, not both")
    if "select" in steps and not (cfg.fraction or cfg.count):
        raise ValueError("--steps select: needs --fraction or --count")
    if (cfg.fraction or cfg.count) and "select" not in steps:
        raise ValueError("--fraction/--count: add 'select' to --steps")
    if "score" in steps and not cfg.score:
        raise ValueError("--steps score: needs --score (a reward source)")
    if cfg.score and "score" not in steps:
        raise ValueError("--score: add 'score' to --steps")
    if cfg.pick not in (*PICKS, "random"):
        raise ValueError(f"--pick: expected one of {', '.join(PICKS)}, random, got {cfg.pick!r}")
    if cfg.pick == "quality" and "select" in steps and ("score" not in steps or steps.index("score") > steps.index("select")):
        raise ValueError("--pick quality: needs the 'score' step before 'select' in --steps")
    if cfg.length_unit != "words" and not (cfg.length_unit.startswith("tokens:") and len(cfg.length_unit) > len("tokens:")):
        raise ValueError(f"--length-unit: expected 'words' or 'tokens:MODEL', got {cfg.length_unit!r}")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ValueError(f"--output-dir: {cfg.output_dir} exists and is not a directory")
    if cfg.kmeans not in ("faiss", "sklearn"):
        raise ValueError(f"--kmeans: expected faiss or sklearn, got {cfg.kmeans!r}")
    if cfg.embedder != "minilm" and not (cfg.embedder.startswith("causal:") and len(cfg.embedder) > len("causal:")):
        raise ValueError(f"--embedder: expected 'minilm' or 'causal:MODEL', got {cfg.embedder!r}")


@dataclass
class Drop:
    step: str
    rule: str
    detail: str = ""
    duplicate_of: int | None = None


class Curation:
    """The state the steps share: records, their views, the rows still alive, drops, scores, embeddings."""

    def __init__(self, cfg: CurateConfig, records: list[Record]):
        self.cfg, self.records = cfg, records
        self.views: list[View] = [view(r.data) for r in records]
        self.texts = [v.full for v in self.views]
        self.alive: list[int] = list(range(len(records)))
        self.drops: dict[int, Drop] = {}
        self.scores = np.full(len(records), np.nan, dtype=np.float32)
        self.embedded: dict[int, np.ndarray] = {}
        self.embedder = None
        self.reward = None
        self.stats: dict[str, float] = {}

    def drop(self, dropped: dict[int, Drop]) -> None:
        self.drops.update(dropped)
        self.alive = [i for i in self.alive if i not in dropped]

    def embeddings(self, rows: list[int]) -> np.ndarray:
        """(len(rows), d) unit vectors, embedding (and caching) each row once per run."""
        from alignkit.curate.embed import Embedder, EmbeddingCache, embed

        missing = [i for i in rows if i not in self.embedded]
        if missing:
            t0 = time.perf_counter()
            if self.embedder is None:
                self.embedder = Embedder(self.cfg.embedder, self.cfg.embed_max_length, self.cfg.embed_batch_size)
            from alignkit.models import cache_dir

            directory = Path(self.cfg.cache_dir) if self.cfg.cache_dir else cache_dir() / "embeddings"
            vectors, n = embed([self.texts[i] for i in missing], self.embedder, EmbeddingCache(directory, self.embedder.id))
            self.embedded.update(zip(missing, vectors))
            self.stats["embedded"] = self.stats.get("embedded", 0) + n
            self.stats["cache_hits"] = self.stats.get("cache_hits", 0) + len(missing) - n
            self.stats["embed_seconds"] = self.stats.get("embed_seconds", 0.0) + time.perf_counter() - t0
        self.stats["encoder_calls"] = self.embedder.calls if self.embedder else 0
        return np.stack([self.embedded[i] for i in rows])


# ---------------------------------------------------------------------------------------------------- steps


def step_exact(c: Curation) -> dict[int, Drop]:
    from alignkit.curate.dedup import exact_duplicates

    return {i: Drop("exact", "duplicate", d, j) for i, (j, d) in exact_duplicates(c.alive, c.texts).items()}


def step_near(c: Curation) -> dict[int, Drop]:
    from alignkit.curate.dedup import near_duplicates

    found = near_duplicates(c.alive, c.texts, c.cfg.near_threshold, c.cfg.num_perm, c.cfg.shingle, c.cfg.seed)
    return {i: Drop("near", "near_duplicate", d, j) for i, (j, d) in found.items()}


def step_semantic(c: Curation) -> dict[int, Drop]:
    from alignkit.curate.dedup import semantic_duplicates
    from alignkit.curate.select import kmeans

    x = c.embeddings(c.alive)
    k = c.cfg.semantic_clusters or math.ceil(math.sqrt(len(c.alive)))
    _, labels = kmeans(x, k, c.cfg.seed, c.cfg.kmeans)
    found = semantic_duplicates(c.alive, x, labels, c.cfg.semantic_threshold)
    return {i: Drop("semantic", "semantic_duplicate", d, j) for i, (j, d) in found.items()}


def step_quality(c: Curation) -> dict[int, Drop]:
    cfg = c.cfg
    settings = RuleSettings(cfg.min_length, cfg.max_length, cfg.repetition_n, cfg.max_repetition,
                            refusal_pattern(cfg.refusal_patterns), length_counter(cfg.length_unit))
    rules = [(name, RULES[name]) for name in cfg.rule_list()]
    dropped = {}
    for i in c.alive:
        for name, rule in rules:
            detail = rule(c.views[i], settings)
            if detail is not None:
                dropped[i] = Drop("quality", name, detail)
                break
    return dropped


def load_score(spec: str):
    """The reward source of --score, loaded before any step runs; a bad spec is one line."""
    from alignkit.rewards import load_reward

    try:
        return load_reward(spec)
    except (ValueError, ImportError, AttributeError, TypeError, OSError) as e:
        raise ValueError(f"--score {spec!r}: {str(e).splitlines()[0]}") from None


def step_score(c: Curation, batch_size: int = 256) -> dict[int, Drop]:
    reward = c.reward
    for start in range(0, len(c.alive), batch_size):
        rows = c.alive[start:start + batch_size]
        values = reward([c.views[i].prompt for i in rows], [c.views[i].response or "" for i in rows])
        c.scores[rows] = np.asarray(values, dtype=np.float32)
    return {i: Drop("score", "min_score", f"score {c.scores[i]:.4f} < {c.cfg.min_score}")
            for i in c.alive if not c.scores[i] >= c.cfg.min_score}  # NaN scores are dropped too


def step_select(c: Curation) -> dict[int, Drop]:
    from alignkit.curate.select import coreset

    cfg = c.cfg
    budget = cfg.count or max(1, math.ceil(cfg.fraction * len(c.records)))
    if budget >= len(c.alive):
        return {}
    if cfg.pick == "random":  # the baseline a core-set must beat: same budget, no embeddings
        chosen = np.random.default_rng(cfg.seed).choice(len(c.alive), budget, replace=False)
        keep = {c.alive[p] for p in chosen}
        return {i: Drop("select", "not_selected", f"random sample of {budget}") for i in c.alive if i not in keep}
    x = c.embeddings(c.alive)
    k = cfg.clusters or min(budget, math.ceil(math.sqrt(len(c.alive))))
    scores = c.scores[c.alive] if cfg.pick == "quality" else None
    chosen, _ = coreset(x, budget, k, cfg.pick, cfg.seed, cfg.kmeans, scores)
    keep = {c.alive[p] for p in chosen}
    return {i: Drop("select", "not_selected", f"core-set of {budget} ({cfg.pick}, {k} clusters)")
            for i in c.alive if i not in keep}


STEP_FUNCTIONS = {"exact": step_exact, "near": step_near, "semantic": step_semantic, "quality": step_quality,
                  "score": step_score, "select": step_select}


# --------------------------------------------------------------------------------------------------- outputs


def _write_atomic(path: Path, lines) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
    os.replace(tmp, path)


def _summary(c: Curation, step_log: list[dict], seconds: float) -> dict:
    examples: dict[str, list] = {}
    for i in sorted(c.drops):
        d = c.drops[i]
        shown = examples.setdefault(f"{d.step}/{d.rule}", [])
        if len(shown) < c.cfg.examples_per_rule:
            shown.append({"index": i, "where": c.records[i].where, "detail": d.detail, "duplicate_of": d.duplicate_of,
                          "text": c.texts[i][:300]})
    counts = Counter(f"{d.step}/{d.rule}" for d in c.drops.values())
    return {"input": len(c.records), "kept": len(c.alive), "dropped": len(c.drops), "steps": step_log,
            "dropped_by_rule": dict(sorted(counts.items())), "examples": examples,
            "timings": {"total_seconds": round(seconds, 3), **{k: round(v, 3) for k, v in c.stats.items()}},
            "config": asdict(c.cfg)}


@checked
def run(cfg: CurateConfig) -> dict:
    check(cfg)
    t_start = time.perf_counter()
    reward = load_score(cfg.score) if cfg.score else None
    records = load_records(cfg.data)
    if not records:
        raise DataError(f"{cfg.data}: no records")
    c = Curation(cfg, records)
    c.reward = reward
    step_log = []
    for name in cfg.step_list():
        t0 = time.perf_counter()
        rows_in = len(c.alive)
        dropped = STEP_FUNCTIONS[name](c) if c.alive else {}
        c.drop(dropped)
        seconds = time.perf_counter() - t0
        rules = Counter(d.rule for d in dropped.values())
        step_log.append({"step": name, "rows_in": rows_in, "dropped": len(dropped), "kept": len(c.alive),
                         "rules": dict(rules), "seconds": round(seconds, 3),
                         "rows_per_second": round(rows_in / seconds, 1) if seconds > 0 else None})
        print(f"curate: {name}: {rows_in} -> {len(c.alive)} ({', '.join(f'{r} {n}' for r, n in rules.items()) or 'none dropped'}) "
              f"in {seconds:.2f}s")
    summary = _summary(c, step_log, time.perf_counter() - t_start)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "curated.jsonl", (json.dumps(records[i].data, ensure_ascii=False) + "\n" for i in c.alive))
    _write_atomic(out / "manifest.jsonl", (
        json.dumps({"index": i, "where": records[i].where, "step": d.step, "rule": d.rule,
                    **({"duplicate_of": d.duplicate_of} if d.duplicate_of is not None else {}), "detail": d.detail},
                   ensure_ascii=False) + "\n"
        for i, d in sorted(c.drops.items())))
    _write_atomic(out / "summary.json", [json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n"])
    print(f"curate: kept {len(c.alive)} of {len(records)} rows -> {out / 'curated.jsonl'}")
    return summary


__all__ = ["CurateConfig", "run", "check", "STEPS"]
