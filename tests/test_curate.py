"""alignkit curate: dedup precision/recall on planted duplicates, core-set coverage, quality rules, outputs, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from alignkit.curate import CurateConfig, run
from alignkit.curate.dedup import crc32_hash, minhash_signatures, semantic_duplicates
from alignkit.curate.rules import RULES, RuleSettings, refusal_pattern
from alignkit.curate.select import allocate, coreset, kmeans, pick_centroid, pick_kcenter
from alignkit.curate.text import view, words


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ near duplicates


def planted_near_duplicates(seed: int = 0):
    """400 random 60-word documents; 100 near copies (1-2 word substitutions: shingle Jaccard >= 52/68 = 0.76);
    100 distinct near-neighbours (the first 40 words of a document + 20 new ones: Jaccard about 0.5)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    docs = [[rng.choice(vocab) for _ in range(60)] for _ in range(400)]
    rows, planted, neighbours = [" ".join(d) for d in docs], {}, []
    for _ in range(100):
        src = rng.randrange(400)
        copy = list(docs[src])
        for _ in range(rng.choice([1, 2])):
            copy[rng.randrange(60)] = rng.choice(vocab)
        planted[len(rows)] = src
        rows.append(" ".join(copy))
        src = rng.randrange(400)
        neighbours.append(len(rows))
        rows.append(" ".join(docs[src][:40] + [rng.choice(vocab) for _ in range(20)]))
    return rows, planted, neighbours


def test_batched_minhash_equals_datasketch():
    from datasketch import MinHash

    texts = ["the quick brown fox jumps over the lazy dog", "hello", "a b c a b c d e f", "Ünïcode, punctuation!!"]
    template = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=crc32_hash)
    batched = minhash_signatures(texts, template.permutations.astype(np.uint32), 3)
    for text, signature in zip(texts, batched):
        w = words(text)
        plain = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=crc32_hash)
        for i in range(max(1, len(w) - 2)):
            plain.update(" ".join(w[i:i + 3]).encode())
        assert np.array_equal(plain.hashvalues, signature)


def test_near_duplicates_precision_recall(tmp_path):
    rows, planted, neighbours = planted_near_duplicates()
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in rows])
    summary = run(CurateConfig(data=str(data), output_dir=str(tmp_path / "out"), steps="near", near_threshold=0.7))
    manifest = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    found = {m["index"]: m["duplicate_of"] for m in manifest}
    true_positive = sum(1 for i, j in found.items() if planted.get(i) == j)
    precision, recall = true_positive / max(1, len(found)), true_positive / len(planted)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert not set(found) & set(neighbours)  # Jaccard ~0.5 neighbours are distinct rows: kept
    assert summary["dropped_by_rule"] == {"near/near_duplicate": len(found)}


def test_exact_duplicates_normalise_case_space_punctuation(tmp_path):
    rows = [{"prompt": "Hi there", "completion": "Hello, world."}, {"prompt": "hi  THERE", "completion": "hello world"},
            {"prompt": "Hi there", "completion": "Goodbye."}]
    run(CurateConfig(data=str(write_jsonl(tmp_path / "d.jsonl", rows)), output_dir=str(tmp_path / "o"), steps="exact"))
    assert read_jsonl(tmp_path / "o" / "manifest.jsonl") == [
        {"index": 1, "where": f"{tmp_path}/d.jsonl:2", "step": "exact", "rule": "duplicate", "duplicate_of": 0,
         "detail": "same normalised text"}]


# ---------------------------------------------------------------------------------------- semantic duplicates


def test_semdedup_drops_planted_paraphrases_keeps_neighbours():
    """Unit vectors: 50 originals, 20 planted copies at cosine > 0.99 to one original, 20 neighbours at cosine
    about 0.8 (distinct). Threshold 0.95: exactly the copies go, each pointing at its original."""
    rng = np.random.default_rng(0)
    d = 64
    base = rng.normal(size=(50, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.integers(0, 50, size=40)
    noise = rng.normal(size=(40, d))
    noise -= (noise * base[src]).sum(1, keepdims=True) * base[src]  # orthogonal to the source
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = np.r_[np.full(20, 0.995), np.full(20, 0.8)][:, None]
    extra = cos * base[src] + np.sqrt(1 - cos**2) * noise
    x = np.concatenate([base, extra]).astype(np.float32)
    _, labels = kmeans(x, 8, seed=0)
    found = semantic_duplicates(list(range(90)), x, labels, threshold=0.95)
    assert {i: j for i, (j, _) in found.items()} == {50 + k: int(src[k]) for k in range(20)}


# ------------------------------------------------------------------------------------------------- core-set


def blobs(seed: int = 0):
    """10 well-separated Gaussian blobs in 32-d with skewed sizes 500..5 (930 rows)."""
    rng = np.random.default_rng(seed)
    sizes = [500, 200, 100, 50, 30, 20, 10, 10, 5, 5]
    centers = rng.normal(size=(10, 32))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.concatenate([c + 0.15 * rng.normal(size=(n, 32)) / np.sqrt(32) for c, n in zip(centers, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(10), sizes)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
@pytest.mark.parametrize("pick", ["centroid", "kcenter", "quality"])
def test_coreset_covers_every_cluster_random_does_not(backend, pick):
    x, truth = blobs()
    scores = np.random.default_rng(1).normal(size=len(x)).astype(np.float32)
    chosen, _ = coreset(x, 20, 20, pick, seed=0, backend=backend, scores=scores)
    assert len(chosen) == 20 and len(set(chosen)) == 20
    assert len(set(truth[chosen])) == 10
    random_cover = [len(set(truth[np.random.default_rng(s).choice(len(x), 20, replace=False)])) for s in range(20)]
    assert max(random_cover) < 10 and np.mean(random_cover) < 7
    again, _ = coreset(x, 20, 20, pick, seed=0, backend=backend, scores=scores)
    assert np.array_equal(chosen, again)  # deterministic under the seed


def test_allocation_hand_computed():
    # budget 5 over sizes (6, 3, 1): one each, then 2 left over room (5, 2, 0): shares (1.43, 0.57, 0)
    # -> floors (1, 0, 0), the larger remainder (0.57) gets the last one -> (2, 2, 1)
    assert allocate(np.array([6, 3, 1]), 5).tolist() == [2, 2, 1]
    assert allocate(np.array([6, 3, 1]), 2).tolist() == [1, 1, 0]  # fewer than clusters: the largest ones
    assert allocate(np.array([6, 3, 1]), 100).tolist() == [6, 3, 1]  # capped by cluster sizes


def test_picks_hand_computed():
    x = np.array([[0.0], [0.1], [0.2], [5.0], [10.0]], dtype=np.float32)
    centroid = np.array([3.0], dtype=np.float32)
    assert pick_centroid(x, centroid, 3, None).tolist() == [3, 2, 1]  # distances 2, 2.8, 2.9
    # k-center: start at 5 (nearest the centroid), then the farthest from {5}: 0 and 10 tie at 5 -> first (0),
    # then the farthest from {5, 0}: 10
    assert pick_kcenter(x, centroid, 3, None).tolist() == [3, 0, 4]


# ------------------------------------------------------------------------------------------------ quality


CLEAN = [
    {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
    {"prompt": "Name a primary colour.", "completion": "Red"},
    {"prompt": "Write a haiku about rain.", "completion": "Soft rain on the roof,\nthe garden drinks quietly,\nspring wakes in the mud."},
    {"prompt": "Explain photosynthesis briefly.",
     "completion": "Plants use sunlight, water and carbon dioxide to make glucose and release oxygen."},
    {"prompt": "Give me three fruits.", "completion": "Apples, pears and plums are all good choices!"},
    {"prompt": "How do I reverse a list in Python?", "completion": "Use `items.reverse()` in place, or `items[::-1]` for a copy."},
    {"messages": [{"role": "user", "content": "Say hello in Spanish."}, {"role": "assistant", "content": "Hola (hello)."}]},
    {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day it looks blue.", "rejected": "no"},
    {"text": "A short note about nothing in particular, written to be perfectly ordinary."},
    {"prompt": "Summarise: The cat sat on the mat all day long.", "completion": "A cat spent the whole day on a mat."},
]

BAD = {  # in the default rule order, so the first rule that fires is the one named
    "empty": [{"prompt": "Hi", "completion": "   "}, {"prompt": "Hi", "completion": ""}],
    "junk": [{"prompt": "Hi", "completion": "Hello \ufffd there."}, {"prompt": "Bad\x07 bell", "completion": "Fine."},
             {"prompt": "Hi", "completion": "C1 control \x85 here."}],
    "length": [{"prompt": "Tell me everything.", "completion": "word " * 30 + "end."}],
    "echo": [{"prompt": "Repeat after me: the sun is hot.", "completion": "The sun is hot."},
             {"prompt": "What is love?", "completion": "what is love"}],
    "refusal": [{"prompt": "Tell a joke.", "completion": "As an AI language model, I do not have a sense of humour."},
                {"prompt": "Fix my car.", "completion": "I'm sorry, but I cannot do that for you."},
                {"prompt": "Do X.", "completion": "Unfortunately I cannot help with that request."}],
    "repetition": [{"prompt": "Describe the sea.", "completion": "The sea is blue. " * 5}],
    "truncated": [{"prompt": "Explain gravity.", "completion": "Gravity is the force that pulls objects toward"},
                  {"prompt": "List pros.", "completion": "There are several pros, such as speed,"}],
}


def test_length_in_tokens(tiny_model_dir):
    from alignkit.curate.rules import length_counter

    count = length_counter(f"tokens:{tiny_model_dir}")
    settings = RuleSettings(min_length=1, max_length=3, count=count)
    assert count("hello") == 1 and count("hello world, how are you") > 3
    assert RULES["length"](view({"prompt": "p", "completion": "hello"}), settings) is None
    assert RULES["length"](view({"prompt": "p", "completion": "hello world, how are you"}), settings).startswith("length")


def test_views_of_every_shape():
    """What the rules judge: the response is the completion, the last assistant turn, chosen, the best-scored
    ranked response, the text; prompt-only rows have none."""
    m = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}]
    assert view({"messages": m}) == view({"messages": m}) and view({"messages": m}).response == "A2"
    assert view({"messages": m}).prompt == "Q1\n\nA1\n\nQ2"
    assert view({"prompt": m[:1], "completion": m[1:2]}).response == "A1"
    pair = view({"prompt": "P", "chosen": "good", "rejected": "bad"})
    assert (pair.prompt, pair.response, pair.full) == ("P", "good", "P\n\ngood\n\nbad")
    assert view({"prompt": "P", "responses": ["x", "y", "z"], "scores": [0.1, 0.9, "0.5"]}).response == "y"
    assert view({"text": "T"}).response == "T" and view({"text": "T"}).prompt == ""
    assert view({"prompt": "only"}).response is None


def test_each_rule_catches_what_it_names_and_nothing_clean():
    settings = RuleSettings(min_length=1, max_length=25, refusal=refusal_pattern())
    for row in CLEAN:
        fired = {name: rule(view(row), settings) for name, rule in RULES.items()}
        assert all(v is None for v in fired.values()), (row, fired)
    for name, rows in BAD.items():
        for row in rows:
            assert RULES[name](view(row), settings) is not None, (name, row)


def test_quality_step_names_the_rule(tmp_path):
    rows = CLEAN + [row for rows in BAD.values() for row in rows]
    expected = [name for name, rows in BAD.items() for _ in rows]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    run(CurateConfig(data=str(data), output_dir=str(tmp_path / "o"), steps="quality", max_length=25))
    manifest = read_jsonl(tmp_path / "o" / "manifest.jsonl")
    assert [m["index"] for m in manifest] == list(range(len(CLEAN), len(rows)))
    assert [m["rule"] for m in manifest] == expected
    assert read_jsonl(tmp_path / "o" / "curated.jsonl") == CLEAN


# ---------------------------------------------------------------------------------- outputs and data layer


def mixed_rows() -> list[dict]:
    topics = {"cooking": "Stir the sauce, add salt and simmer the soup", "football": "The striker scored a goal in the match",
              "astronomy": "The telescope showed a distant galaxy and a comet"}
    rows = []
    for t, (name, sentence) in enumerate(topics.items()):
        for k in range(12):
            rows.append({"prompt": f"Tell me about {name}, part {k}.", "completion": f"{sentence} on day {k}, number {k * 7 + t}."})
    rows += [dict(rows[3]), dict(rows[20])]  # exact copies
    rows += [BAD["refusal"][0], BAD["junk"][0]]
    return rows


def test_manifest_round_trip_and_trainers_read_curated(tmp_path, tiny_model_dir):
    from alignkit.data import preference_example, read_examples, sft_example
    from alignkit.models import load_tokenizer

    rows = mixed_rows()
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out"
    summary = run(CurateConfig(data=str(data), output_dir=str(out), steps="exact,near,quality,score,select",
                               score="vader", count=9, cache_dir=str(tmp_path / "cache")))
    curated, manifest = read_jsonl(out / "curated.jsonl"), read_jsonl(out / "manifest.jsonl")
    dropped = [m["index"] for m in manifest]
    assert len(dropped) == len(set(dropped)) and len(curated) + len(dropped) == len(rows)
    assert curated == [r for i, r in enumerate(rows) if i not in set(dropped)]  # unchanged, in input order
    assert all(m["where"] == f"{data}:{m['index'] + 1}" for m in manifest)
    assert {m["index"]: m.get("duplicate_of") for m in manifest if m["step"] == "exact"} == {36: 3, 37: 20}
    assert summary["kept"] == 9 and summary["input"] == len(rows)
    assert summary["dropped_by_rule"]["quality/refusal"] == 1 and summary["dropped_by_rule"]["quality/junk"] == 1
    assert all(len(v) <= 3 for v in summary["examples"].values())
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert len(read_examples(str(out / "curated.jsonl"), sft_example, tokenizer, 256)) == 9

    pairs = [{"prompt": f"Q{i}: is {i} even?", "chosen": f"{'Yes' if i % 2 == 0 else 'No'}, it is.", "rejected": "Maybe"}
             for i in range(10)]
    pairs += [pairs[0], {"prompt": "Q: anything?", "chosen": "As an AI language model, I cannot.", "rejected": "x"}]
    run(CurateConfig(data=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), output_dir=str(tmp_path / "p")))
    assert len(read_examples(str(tmp_path / "p" / "curated.jsonl"), preference_example, tokenizer, 256)) == 10


def test_embedding_cache_second_selection_embeds_nothing(tmp_path):
    rows = mixed_rows()[:36]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    cache = str(tmp_path / "cache")
    first = run(CurateConfig(data=str(data), output_dir=str(tmp_path / "a"), steps="semantic,select", count=6, cache_dir=cache))
    assert first["timings"]["embedded"] == 36 and first["timings"]["encoder_calls"] == 1
    second = run(CurateConfig(data=str(data), output_dir=str(tmp_path / "b"), steps="select", count=3, pick="kcenter",
                              clusters=3, cache_dir=cache))
    assert second["timings"]["embedded"] == 0 and second["timings"]["encoder_calls"] == 0
    assert second["timings"]["cache_hits"] == 36
    # 3 topics x 12 rows, 3 clusters, 3 picks: one per topic
    kept = read_jsonl(tmp_path / "b" / "curated.jsonl")
    assert sorted(r["prompt"].split(",")[0] for r in kept) == ["Tell me about astronomy", "Tell me about cooking",
                                                               "Tell me about football"]


def test_causal_embedder_unit_vectors(tiny_model_dir):
    from alignkit.curate.embed import Embedder

    e = Embedder(f"causal:{tiny_model_dir}", max_length=32, batch_size=2)
    x = e(["a short one", "a much longer text with more tokens in it", "third"])
    assert x.shape == (3, 64) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5) and e.calls == 2
    # mean pooling ignores padding: the same text alone and padded in a batch embeds the same
    assert np.allclose(e(["a short one"])[0], x[0], atol=1e-5)


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("flags, message", [
    (["--steps", "exact,dedupe"], "--steps: unknown step 'dedupe'"),
    (["--near-threshold", "1.5"], "--near-threshold: expected a number in (0, 1], got 1.5"),
    (["--rules", "length,spam"], "--rules: unknown rule 'spam'"),
    (["--steps", "exact,select"], "--steps select: needs --fraction or --count"),
    (["--steps", "select", "--count", "3", "--pick", "quality"], "--pick quality: needs the 'score' step"),
    (["--data", "nope.jsonl"], "nope.jsonl: no such file or directory"),
    (["--steps", "score", "--score", "nosuchreward"], "--score 'nosuchreward': reward 'nosuchreward': unknown reward"),
    (["--steps", "semantic", "--embedder", "causal:/no/such/model"], "--embedder 'causal:/no/such/model': cannot load"),
    (["--length-unit", "chars"], "--length-unit: expected 'words' or 'tokens:MODEL'"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", CLEAN)
    out = tmp_path / "out"
    argv = ["curate", "--data", str(data), "--output-dir", str(out)] + flags
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_yaml_steps_list(tmp_path):
    from alignkit.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", CLEAN + [CLEAN[0], BAD["junk"][0]])
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {data}\noutput_dir: {tmp_path / 'out'}\nsteps: [quality, exact]\n")
    assert main(["curate", "--config", str(config)]) == 0
    manifest = read_jsonl(tmp_path / "out" / "manifest.jsonl")
    assert [(m["step"], m["rule"]) for m in manifest] == [("exact", "duplicate"), ("quality", "junk")]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["config"]["steps"] == "quality,exact"


def test_random_pick_is_a_seeded_uniform_sample_without_embeddings(tmp_path):
    """--pick random: the baseline arm of a curation study: exactly the budget, the same rows under the same seed,
    other rows under another, and no encoder call."""
    rows = [{"prompt": f"Q{i}", "completion": f"answer number {i}"} for i in range(200)]
    data = write_jsonl(tmp_path / "r.jsonl", rows)

    def kept(seed: int, name: str) -> list[str]:
        summary = run(CurateConfig(data=str(data), output_dir=str(tmp_path / name), steps="select", fraction=0.05,
                                   pick="random", seed=seed, cache_dir=str(tmp_path / "cache")))
        assert summary["timings"].get("encoder_calls", 0) == 0
        return [r["prompt"] for r in read_jsonl(tmp_path / name / "curated.jsonl")]

    a, b, c = kept(0, "a"), kept(0, "b"), kept(1, "c")
    assert len(a) == 10 and a == b and a != c
    manifest = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    assert len(manifest) == 190 and {m["rule"] for m in manifest} == {"not_selected"}
