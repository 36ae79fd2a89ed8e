"""Duplicate removal: exact (hash), near (MinHash + LSH), semantic (SemDeDup). The first occurrence is kept.

Each function takes the rows still alive, in input order, and returns ``{dropped row: (kept row, detail)}``.

- Exact: BLAKE2b of the normalised text (``text.normalise``): O(N) time, 16 bytes per distinct row.
- Near: MinHash (Broder 1997) signatures of word shingles, banded LSH (Indyk & Motwani 1998; Leskovec et
  al., *Mining of Massive Datasets* ch. 3) from datasketch. A candidate the LSH returns is confirmed only if
  the signatures' estimated Jaccard ≥ threshold, which removes most band false positives. O(N·(S·P + b)) time
  for S shingles, P permutations, b bands; memory O(N·P) for the index.
- Semantic: SemDeDup (Abbas et al. 2023, https://arxiv.org/abs/2303.09540): K-means on L2-normalised
  embeddings, then within each cluster a row is dropped when its cosine to an already kept row of the cluster
  exceeds ``threshold``. O(N·k·iters·d) for K-means plus O(Σ_c n_c²·d) for the within-cluster similarities.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from alignkit.curate.text import text_hash, words


def exact_duplicates(rows: Sequence[int], texts: Sequence[str]) -> dict[int, tuple[int, str]]:
    first: dict[bytes, int] = {}
    dropped = {}
    for i in rows:
        key = text_hash(texts[i])
        if key in first:
            dropped[i] = (first[key], "same normalised text")
        else:
            first[key] = i
    return dropped


# ------------------------------------------------------------------------------------------------ MinHash


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit CRC32 of each word ``size``-gram of the normalised text (the whole text if it is shorter)."""
    w = words(text)
    grams = [" ".join(w[i:i + size]) for i in range(max(1, len(w) - size + 1))]
    return np.fromiter((zlib.crc32(g.encode("utf-8")) for g in set(grams)), dtype=np.uint32)


def crc32_hash(data: bytes) -> int:
    """The hash datasketch applies to each shingle in the plain (unbatched) path; equal to ``shingle_hashes``'s."""
    return zlib.crc32(data)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, the pre-mix datasketch's "affine32" scheme applies before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(texts: Sequence[str], permutations: np.ndarray, shingle: int) -> np.ndarray:
    """(B, P) uint32 MinHash signatures of a batch, identical to datasketch's ``MinHash(scheme="affine32",
    hashfunc=crc32_hash).update_batch(shingles)`` for each text, but with one vectorised pass over all the
    batch's shingles: phv = a·fmix(h) + b (mod 2^32) as one (P, S_total) array, then a segmented min per text
    (``np.minimum.reduceat`` along the contiguous axis, 13x faster than along axis 0) instead of B separate
    Python-level updates."""
    hashes = [shingle_hashes(t, shingle) for t in texts]
    offsets = np.zeros(len(hashes), dtype=np.int64)
    np.cumsum([len(h) for h in hashes[:-1]], out=offsets[1:])
    a, b = permutations  # (P,) each, uint32, a odd
    phv = np.multiply.outer(a, _fmix32(np.concatenate(hashes)))  # (P, S_total); uint32 wraps: mod 2^32
    phv += b[:, None]
    return np.ascontiguousarray(np.minimum.reduceat(phv, offsets, axis=1).T)  # (B, P)


def near_duplicates(
    rows: Sequence[int], texts: Sequence[str], threshold: float, num_perm: int, shingle: int, seed: int,
    batch_size: int = 256,
) -> dict[int, tuple[int, str]]:
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    template = MinHash(num_perm=num_perm, seed=seed, scheme="affine32", hashfunc=crc32_hash)
    permutations = template.permutations.astype(np.uint32)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept_sigs: dict[int, np.ndarray] = {}
    dropped = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        signatures = minhash_signatures([texts[i] for i in batch], permutations, shingle)
        for i, sig in zip(batch, signatures):
            sketch = LeanMinHash(seed=seed, hashvalues=sig, scheme="affine32")
            best, best_j = -1, 0.0
            for j in lsh.query(sketch):
                jaccard = float(np.mean(kept_sigs[j] == sig))  # the MinHash estimate of Jaccard(i, j)
                if jaccard > best_j or (jaccard == best_j and j < best):
                    best, best_j = j, jaccard
            if best >= 0 and best_j >= threshold:
                dropped[i] = (best, f"estimated Jaccard {best_j:.2f}")
            else:
                lsh.insert(i, sketch, check_duplication=False)
                kept_sigs[i] = sig
    return dropped


# ------------------------------------------------------------------------------------------------ SemDeDup


def semantic_duplicates(
    rows: Sequence[int], embeddings: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[int, tuple[int, str]]:
    """``embeddings`` (N, d) L2-normalised and ``labels`` (N,) cluster ids, aligned with ``rows``."""
    rows = np.asarray(rows)
    dropped = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # positions in rows, ascending = input order
        e = embeddings[members]  # (m, d)
        kept: list[int] = []  # positions within the cluster
        for start in range(0, len(members), 1024):  # (1024, m) similarity blocks bound the memory
            sims = e[start:start + 1024] @ e.T  # cosine, since rows are unit vectors
            for k in range(sims.shape[0]):
                p = start + k
                if kept:
                    s = sims[k, kept]
                    j = int(np.argmax(s))
                    if s[j] > threshold:
                        dropped[int(rows[members[p]])] = (int(rows[members[kept[j]]]), f"cosine {s[j]:.3f}")
                        continue
                kept.append(p)
    return dropped
