"""Core-set selection: K-means on the embeddings, a budget split across clusters, a pick rule per cluster.

The recipe of "Maybe Only 0.5% Data is Needed" (Chen et al. 2023, https://arxiv.org/abs/2305.09246): embed,
cluster with K-means, keep a few core samples per cluster, so the subset spans every region of the data instead
of the dense ones random sampling favours.

- K-means: faiss (Johnson et al. 2019) or scikit-learn (Lloyd's algorithm, k-means++ init), both seeded; never
  hand-written. O(N·k·d·iters) time, O(N·d + k·d) memory.
- Allocation: budget n over clusters of sizes s_c: if n < k, one each for the n largest clusters; else one each
  plus the rest proportional to s_c (largest remainders), never more than s_c.
- Pick within a cluster (O(s_c·d), k-center O(n_c·s_c·d)):
  ``centroid``: the n_c rows nearest to the centroid;
  ``kcenter``: k-center greedy (Gonzalez 1985; Sener & Savarese 2018, https://arxiv.org/abs/1708.00489): start
  at the row nearest the centroid, then repeatedly add the row farthest from all picked ones (coverage);
  ``quality``: the n_c highest scores (ties: nearer the centroid).
"""

from __future__ import annotations

import numpy as np


def kmeans(x: np.ndarray, k: int, seed: int, backend: str = "faiss", iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d), labels (N,)) of K-means on x (N, d) float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(k, len(x)))
    if backend == "faiss":
        import faiss
        from sklearn.cluster import kmeans_plusplus

        # faiss seeds its centroids with uniformly random points, which leaves small far-off clusters without a
        # centroid of their own (measured: a 10-blob set with blobs of 5..500 points lost 2-4 blobs of a
        # 20-row core-set). k-means++ seeding (Arthur & Vassilvitskii 2007) from scikit-learn fixes that; it
        # runs on a sample of at most 64 points per centroid to stay O(64·k²·d·log k), a few Lloyd iterations.
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= 64 * k else x[np.sort(rng.choice(len(x), 64 * k, replace=False))]
        init, _ = kmeans_plusplus(sample, k, random_state=seed)
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, len(x) // k + 1))  # every row in every iteration
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        _, labels = km.index.search(x, 1)
        return km.centroids, labels[:, 0].astype(np.int64)
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(x)
        return km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64)
    raise ValueError(f"--kmeans: expected faiss or sklearn, got {backend!r}")


def allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """How many rows to take from each cluster (see module docstring); sums to min(budget, sizes.sum())."""
    sizes = np.asarray(sizes, dtype=np.int64)
    take = np.zeros_like(sizes)
    budget = min(budget, int(sizes.sum()))
    order = np.argsort(-sizes, kind="stable")  # largest first; ties by cluster id
    nonempty = order[sizes[order] > 0]
    if budget < len(nonempty):
        take[nonempty[:budget]] = 1
        return take
    take[nonempty] = 1
    while take.sum() < budget:  # proportional shares of what is left, capped by cluster size
        room = sizes - take
        left = budget - int(take.sum())
        share = left * room / room.sum()
        extra = np.floor(share).astype(np.int64)
        remainder_order = np.argsort(-(share - extra), kind="stable")
        short = left - int(extra.sum())
        extra[remainder_order[:short]] += 1
        take += np.minimum(extra, room)
    return take


def pick_centroid(x: np.ndarray, centroid: np.ndarray, n: int, scores: np.ndarray | None) -> np.ndarray:
    d = ((x - centroid) ** 2).sum(1)
    return np.argsort(d, kind="stable")[:n]


def pick_kcenter(x: np.ndarray, centroid: np.ndarray, n: int, scores: np.ndarray | None) -> np.ndarray:
    first = int(np.argmin(((x - centroid) ** 2).sum(1)))
    picked = [first]
    nearest = ((x - x[first]) ** 2).sum(1)  # squared distance of each row to its nearest picked row
    for _ in range(n - 1):
        j = int(np.argmax(nearest))
        picked.append(j)
        nearest = np.minimum(nearest, ((x - x[j]) ** 2).sum(1))
    return np.array(picked, dtype=np.int64)


def pick_quality(x: np.ndarray, centroid: np.ndarray, n: int, scores: np.ndarray | None) -> np.ndarray:
    d = ((x - centroid) ** 2).sum(1)
    return np.lexsort((d, -scores))[:n]  # by score descending, then distance ascending


PICKS = {"centroid": pick_centroid, "kcenter": pick_kcenter, "quality": pick_quality}


def coreset(
    x: np.ndarray, budget: int, clusters: int, pick: str, seed: int, backend: str = "faiss",
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into x (sorted) of the core-set, and the cluster label of every row."""
    choose = PICKS[pick]
    centroids, labels = kmeans(x, clusters, seed, backend)
    sizes = np.bincount(labels, minlength=len(centroids))
    take = allocate(sizes, budget)
    chosen = []
    for c in np.flatnonzero(take):
        members = np.flatnonzero(labels == c)
        local = choose(x[members], centroids[c], int(take[c]), None if scores is None else scores[members])
        chosen.append(members[local])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64), labels
