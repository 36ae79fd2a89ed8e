"""alignkit curate at scale: rows/s per step, embedding throughput, K-means (faiss vs scikit-learn), peak memory.

    .venv/bin/python bench/bench_curate.py [--rows 1000000] [--kmeans-sizes 100000,1000000] [--minhash-rows 20000]

Sections, each in its own process so its peak RSS is its own:

1. ``pipeline``: ``alignkit curate --steps exact,near,quality`` on ``--rows`` synthetic short SFT examples
   (prompt + a 12-40 word answer from a 5,000-word vocabulary; 10% exact copies, 5% near copies with one word
   changed, 2% U+FFFD junk, 2% refusals, 1% truncated) read from JSONL: rows/s of each step, peak RSS.
2. ``minhash``: signatures of ``--minhash-rows`` rows three ways: datasketch's plain use (one ``MinHash`` per row,
   ``update`` per shingle, its default SHA-1 hash), datasketch's ``MinHash.bulk`` (``update_batch`` per row), and
   alignkit's batched path (one vectorised pass per 256 rows, identical signatures to ``update_batch``).
3. ``embed``: embedding throughput (texts/s) of the bundled all-MiniLM-L6-v2 and of ``causal:smollm2-135m``.
4. ``kmeans``: faiss vs scikit-learn K-means (k = ceil(sqrt(N)), 20 iterations, 384-d random unit vectors drawn
   around k random centres) at each of ``--kmeans-sizes``, then SemDeDup and a core-set selection (0.5%) on the
   same vectors: seconds and peak RSS.

Complexity (N rows, L words per row, P permutations, b LSH bands, d embedding dims, k clusters, I iterations):
exact O(N·L); near O(N·L·P) signatures + O(N·b) LSH; quality O(N·L); score O(N) reward calls; embedding O(N·T²·layers)
forward passes; K-means O(N·k·d·I); SemDeDup O(Σ_c n_c²·d) ≈ O(N²·d/k); core-set allocation O(k log k), picks
O(N·d) (centroid) or O(n_c·s_c·d) per cluster (k-center). Memory: the records O(N·L), the LSH index O(N·(P+b)), the
embeddings O(N·d) (float32: 1.5 GB for 1M x 384).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = [f"{rng.choice('bcdfghklmnprstvz')}{rng.choice('aeiou')}{rng.choice('lmnrst')}{i}" for i in range(5000)]
    rows: list[dict] = []
    while len(rows) < n:
        u = rng.random()
        if rows and u < 0.10:
            rows.append(dict(rows[rng.randrange(len(rows))]))
            continue
        if rows and u < 0.15:
            src = dict(rows[rng.randrange(len(rows))])
            w = src["completion"].split()
            w[rng.randrange(len(w))] = rng.choice(vocab)
            src["completion"] = " ".join(w)
            rows.append(src)
            continue
        answer = " ".join(rng.choice(vocab) for _ in range(rng.randint(12, 40)))
        if u < 0.17:
            answer = answer + " \ufffd."
        elif u < 0.19:
            answer = "As an AI language model, I cannot " + answer + "."
        elif u < 0.20:
            pass  # truncated: no terminal punctuation
        else:
            answer = answer.capitalize() + "."
        rows.append({"prompt": "Question: " + " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 12))) + "?",
                     "completion": answer})
    return rows


# ------------------------------------------------------------------------------------------------- sections


def section_pipeline(args) -> dict:
    from alignkit.curate import CurateConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = Path(tmp) / "rows.jsonl"
        with path.open("w") as f:
            for row in synthetic_rows(args.rows):
                f.write(json.dumps(row) + "\n")
        make_s = time.perf_counter() - t0
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        summary = run(CurateConfig(data=str(path), output_dir=str(Path(tmp) / "out"), steps="exact,near,quality"))
        total = time.perf_counter() - t0
    steps = {s["step"]: {"rows_in": s["rows_in"], "dropped": s["dropped"], "seconds": s["seconds"],
                         "rows_per_s": s["rows_per_second"]} for s in summary["steps"]}
    return {"rows": args.rows, "make_data_s": round(make_s, 1), "total_s": round(total, 1),
            "read_and_view_s": round(total - sum(s["seconds"] for s in summary["steps"]), 1),
            "kept": summary["kept"], "steps": steps, "dropped_by_rule": summary["dropped_by_rule"],
            "peak_rss_mb_before_run": round(rss_before), "peak_rss_mb": round(peak_rss_mb())}


def section_minhash(args) -> dict:
    import numpy as np
    from datasketch import MinHash

    from alignkit.curate.dedup import crc32_hash, minhash_signatures
    from alignkit.curate.text import words

    rows = synthetic_rows(args.minhash_rows, seed=1)
    texts = [r["prompt"] + "\n\n" + r["completion"] for r in rows]

    def shingles(text):
        w = words(text)
        return {" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))}

    out = {"rows": len(texts), "num_perm": 128}
    t0 = time.perf_counter()
    for text in texts:  # the plain use: a MinHash per row, update() per shingle, SHA-1
        m = MinHash(num_perm=128)
        for s in shingles(text):
            m.update(s.encode("utf-8"))
    out["datasketch_plain_rows_per_s"] = round(len(texts) / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    bulk = MinHash.bulk(([s.encode() for s in shingles(t)] for t in texts), num_perm=128, hashfunc=crc32_hash)
    out["datasketch_bulk_crc32_rows_per_s"] = round(len(texts) / (time.perf_counter() - t0))
    template = MinHash(num_perm=128, scheme="affine32", hashfunc=crc32_hash)
    perms = template.permutations.astype(np.uint32)
    t0 = time.perf_counter()
    sigs = np.concatenate([minhash_signatures(texts[i:i + 256], perms, 3) for i in range(0, len(texts), 256)])
    out["alignkit_batched_rows_per_s"] = round(len(texts) / (time.perf_counter() - t0))
    out["batched_equals_bulk"] = bool(all(np.array_equal(m.hashvalues, s) for m, s in zip(bulk, sigs)))
    out["speedup_vs_plain"] = round(out["alignkit_batched_rows_per_s"] / out["datasketch_plain_rows_per_s"], 1)
    out["speedup_vs_bulk"] = round(out["alignkit_batched_rows_per_s"] / out["datasketch_bulk_crc32_rows_per_s"], 1)
    return out


def section_embed(args) -> dict:
    from alignkit.curate.embed import Embedder

    rows = synthetic_rows(args.embed_rows, seed=2)
    texts = [r["prompt"] + "\n\n" + r["completion"] for r in rows]
    out = {}
    for spec, n in (("minilm", len(texts)), ("causal:smollm2-135m", max(64, len(texts) // 8))):
        embedder = Embedder(spec, max_length=128, batch_size=64)
        embedder(texts[:64])  # warm-up
        t0 = time.perf_counter()
        embedder(texts[:n])
        out[spec] = {"texts": n, "texts_per_s": round(n / (time.perf_counter() - t0), 1)}
    out["peak_rss_mb"] = round(peak_rss_mb())
    return out


def section_kmeans(args) -> dict:
    import numpy as np

    from alignkit.curate.dedup import semantic_duplicates
    from alignkit.curate.select import allocate, kmeans, pick_centroid

    n, d = args.n, 384
    k = args.k or math.ceil(math.sqrt(n))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    x = centres[rng.integers(0, k, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    del centres
    out = {"n": n, "d": d, "k": k}
    labels = None
    for backend in args.backends.split(","):
        t0 = time.perf_counter()
        centroids, labels = kmeans(x, k, seed=0, backend=backend)
        out[f"{backend}_s"] = round(time.perf_counter() - t0, 1)
        out[f"{backend}_inertia_per_row"] = round(float(((x - centroids[labels]) ** 2).sum() / n), 4)
    t0 = time.perf_counter()
    found = semantic_duplicates(list(range(n)), x, labels, threshold=0.95)
    out["semdedup_s"] = round(time.perf_counter() - t0, 1)
    out["semdedup_dropped"] = len(found)
    t0 = time.perf_counter()
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
    take = allocate(np.diff(bounds), math.ceil(0.005 * n))
    picked = [order[bounds[c]:bounds[c + 1]][pick_centroid(x[order[bounds[c]:bounds[c + 1]]], centroids[c], int(t), None)]
              for c, t in enumerate(take) if t]
    out["coreset_select_s"] = round(time.perf_counter() - t0, 2)
    out["coreset_rows"] = int(sum(len(p) for p in picked))
    out["peak_rss_mb"] = round(peak_rss_mb())
    return out


SECTIONS = {"pipeline": section_pipeline, "minhash": section_minhash, "embed": section_embed, "kmeans": section_kmeans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--minhash-rows", type=int, default=20_000)
    parser.add_argument("--embed-rows", type=int, default=1024)
    parser.add_argument("--kmeans-sizes", default="100000,1000000")
    parser.add_argument("--backends", default="faiss,sklearn")
    parser.add_argument("--k", type=int, default=0, help="K-means clusters; 0: ceil(sqrt(N))")
    parser.add_argument("--sections", default="minhash,embed,kmeans,pipeline")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        print(json.dumps(SECTIONS[args.section](args)))
        return
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (timings on a shared machine are inflated)")
    results = {}
    for name in args.sections.split(","):
        sizes = [int(s) for s in args.kmeans_sizes.split(",")] if name == "kmeans" else [None]
        for n in sizes:
            argv = [sys.executable, __file__, "--section", name, "--rows", str(args.rows), "--minhash-rows",
                    str(args.minhash_rows), "--embed-rows", str(args.embed_rows), "--backends", args.backends, "--k", str(args.k)]
            argv += ["--n", str(n)] if n else []
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"section {name} failed")
            key = f"{name}@{n}" if n else name
            results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{key}: {json.dumps(results[key])}  (load {os.getloadavg()[0]:.1f})", flush=True)
    print(__doc__[__doc__.index("Complexity"):])


if __name__ == "__main__":
    main()
