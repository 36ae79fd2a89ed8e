"""Build the noisy SFT pool of the curation study (examples/curation_study.sh) from the base model's own samples.

  python examples/make_curation_pool.py POOL_BON HELDOUT_BON OUT_DIR

POOL_BON, HELDOUT_BON: bon.jsonl files ({prompt, responses, scores}; VADER scores) of the training and the held-out
movie-review openings. Writes to OUT_DIR:
- pool.jsonl, {prompt, completion, kind}: every training continuation cut back to its last full sentence
  (kind "sample": positive and negative alike; the task wants positive ones), plus what a scraped or pooled
  instruction set carries: exact copies (verbatim or re-cased/re-spaced), near copies (one word changed or added),
  junk (control characters, a looping phrase, a response cut mid-word, the prompt echoed back, a boilerplate
  refusal) and off-topic rows (the bundled general instructions); shuffled under a fixed seed;
- heldout.jsonl, {prompt, completion}: per held-out opening, its most positive continuation (VADER): the target the
  held-out loss is measured on.
Prints the pool's composition.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from alignkit.data import load_records

SENTENCE_END = re.compile(r"[.!?…][\"')\]]*")


def full_sentences(text: str) -> str:
    """The text up to its last sentence end (a sampled continuation stops at max_new_tokens, mid-sentence)."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else ""


def read_bon(path: str) -> list[dict]:
    return [r.data for r in load_records(path)]


def main(pool_bon: str, heldout_bon: str, out_dir: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    samples = []
    for row in read_bon(pool_bon):
        for response in row["responses"]:
            text = full_sentences(response)
            if len(text.split()) >= 3:
                samples.append({"prompt": row["prompt"], "completion": text, "kind": "sample"})
    n = len(samples)
    pool = list(samples)
    for _ in range(n // 6):  # exact copies, half of them re-cased and re-spaced (the same after normalising)
        src = dict(rng.choice(samples), kind="exact_copy")
        if rng.random() < 0.5:
            src["completion"] = "  " + src["completion"].upper().replace(" ", "  ")
        pool.append(src)
    for _ in range(n // 8):  # near copies: one word replaced or one added
        src = dict(rng.choice(samples), kind="near_copy")
        words = src["completion"].split()
        i = rng.randrange(len(words))
        if rng.random() < 0.5:
            words[i] = rng.choice(["really", "truly", "quite", "very", "rather"])
        else:
            words.insert(i, rng.choice(["really", "truly", "quite", "very", "rather"]))
        src["completion"] = " ".join(words)
        pool.append(src)
    junk = {
        "control": lambda p, c: c[: len(c) // 2] + "\x00\x07\x1b[0m\ufffd\ufffd" + c[len(c) // 2 :],
        "loop": lambda p, c: " ".join(["the best movie ever made"] * 12),
        "cut": lambda p, c: c.rstrip(".!?…\"') ") + " and then the mov",
        "echo": lambda p, c: p,
        "refusal": lambda p, c: "I'm sorry, but as an AI language model I cannot write a movie review.",
    }
    for kind, make in junk.items():
        for _ in range(n // 40):
            src = rng.choice(samples)
            pool.append({"prompt": src["prompt"], "completion": make(src["prompt"], src["completion"]),
                         "kind": f"junk_{kind}"})
    for record in load_records("bundled:instructions_train"):  # off topic for a movie-review model
        messages = record.data["messages"]
        pool.append({"prompt": messages[0]["content"], "completion": messages[1]["content"], "kind": "off_topic"})
    rng.shuffle(pool)

    heldout = []
    for row in read_bon(heldout_bon):
        ranked = sorted(zip(row["scores"], row["responses"], strict=True), key=lambda t: -t[0])
        best = next((full_sentences(r) for _, r in ranked if len(full_sentences(r).split()) >= 3), None)
        if best:
            heldout.append({"prompt": row["prompt"], "completion": best})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    print(json.dumps({"pool": len(pool), "heldout": len(heldout), "kinds": Counter(r["kind"] for r in pool)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
