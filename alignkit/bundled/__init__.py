"""Small datasets shipped inside the package, so examples and tests run offline.

Each dataset has a train and a test split stored as JSONL next to this file; see README.md here for
what each file holds and how it was made.
"""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).parent


def available() -> list[str]:
    """Names accepted by :func:`bundled_path`: every file stem, plus each dataset's bare name."""
    stems = sorted(p.stem for p in _DIR.glob("*.jsonl"))
    bases = {s.rsplit("_", 1)[0] for s in stems if s.endswith(("_train", "_test"))}
    return sorted(set(stems) | bases)


def bundled_path(name: str) -> Path:
    """Path of a bundled JSONL file.

    ``name`` is a file stem such as ``"instructions_test"`` or ``"movie_prompts_train"``, or a bare dataset
    name such as ``"instructions"``, which means its train split. A trailing ``.jsonl`` is ignored.
    """
    stem = name.removesuffix(".jsonl")
    names = available()
    if stem not in names:  # checked against the listing, so a name can never reach outside this folder
        raise ValueError(f"unknown bundled dataset {name!r}; available: {', '.join(names)}")
    path = _DIR / f"{stem}.jsonl"
    return path if path.is_file() else _DIR / f"{stem}_train.jsonl"
