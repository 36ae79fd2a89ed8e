"""Read raw records from JSONL, JSON, Parquet, CSV, Hugging Face ``datasets`` objects or saved directories.

Every record keeps where it came from (``file:line`` or ``file:row``) so that a validation error names it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data. The message is one line: where, which field, what was expected.

    ``reason`` is a short category used to count skipped records."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    where: str  # "train.jsonl:12" (line) or "train.parquet:row 12"


def load_records(source: Any, split: str = "train") -> list[Record]:
    """Load records from a path (.jsonl/.json/.parquet/.csv, a saved ``datasets`` directory), a ``bundled:NAME``
    dataset, a ``datasets.Dataset``/``DatasetDict``, or a list of dicts."""
    if isinstance(source, list):
        return [_as_record(row, f"<list>:row {i}") for i, row in enumerate(source)]
    if not isinstance(source, (str, Path)):
        return _from_hf(source, split, name=type(source).__name__)
    if str(source).startswith("bundled:"):
        from alignkit.bundled import bundled_path

        source = bundled_path(str(source)[len("bundled:") :])
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        from datasets import load_from_disk

        return _from_hf(load_from_disk(str(path)), split, name=str(path))
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [_as_record(row, f"{path}:row {i + 1}") for i, row in enumerate(rows)]
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json, .parquet, .csv or a directory")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
            records.append(_as_record(row, f"{path}:{number}"))
    return records


def _read_csv(path: Path) -> list[Record]:
    records, line = [], 2  # the header is line 1
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            records.append(Record(dict(row), f"{path}:line {line}"))
            line = reader.line_num + 1  # a quoted cell may span several lines
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}), got {type(rows).__name__}")
    return [_as_record(row, f"{path}:item {i + 1}") for i, row in enumerate(rows)]


def _from_hf(dataset: Any, split: str, name: str) -> list[Record]:
    if isinstance(dataset, dict):  # DatasetDict / IterableDatasetDict subclass dict (and also have column_names)
        if split not in dataset:
            raise DataError(f"{name}: no split {split!r}; available: {', '.join(dataset.keys())}")
        dataset = dataset[split]
    return [_as_record(row, f"{name}:row {i + 1}") for i, row in enumerate(dataset)]


def _as_record(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return Record(row, where)
