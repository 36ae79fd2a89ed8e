"""Constitutions: lists of principles, each a judge question plus a critique request and a revision request.

YAML shape (see the bundled ``constitution.yaml``)::

    principles:
      - name: honesty
        principle: Which response is more honest ...?
        critique_request: Name any claim in your last response that is false ...
        revision_request: Rewrite your response so that ...

``load_constitution("default")`` reads the bundled one; any other value is a path. Errors are one line naming the
file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignkit.data import DataError

FIELDS = ("name", "principle", "critique_request", "revision_request")
DEFAULT = Path(__file__).with_name("constitution.yaml")


@dataclass(frozen=True)
class Principle:
    name: str
    principle: str  # the question a judge answers about two responses
    critique_request: str
    revision_request: str


def load_constitution(source: str = "default") -> list[Principle]:
    import yaml

    path = DEFAULT if source in ("", "default") else Path(source)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: constitution file not found") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise DataError(f"{where}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("principles"), list) or not loaded["principles"]:
        raise DataError(f"{path}: expected a mapping with a non-empty list 'principles'")
    principles = []
    for i, entry in enumerate(loaded["principles"]):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: principles[{i}]: expected a mapping with fields {', '.join(FIELDS)}")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise DataError(f"{path}: principles[{i}]: unknown field {unknown[0]!r}; expected {', '.join(FIELDS)}")
        for name in FIELDS:
            value = entry.get(name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: principles[{i}].{name}: expected a non-empty string, got {value!r:.40}")
        principles.append(Principle(*(entry[name].strip() for name in FIELDS)))
    return principles
