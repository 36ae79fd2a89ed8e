"""Read raw records from JSONL, JSON, Parquet, CSV, Hugging Face ``datasets`` objects or saved directories.

Every record keeps where it came from (``file:line`` or ``file:row``) so that a validation error names it.
"""

from __future__ import annotations

import codecs
import csv
import io
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


TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def text_file_problem(path: Path, chunk_size: int = 1 << 20) -> str | None:
    """What makes a JSONL/JSON/CSV file unreadable before any record is parsed: no text at all, or bytes that
    are not UTF-8 (the line and byte offset named). Streams the file, so it is cheap to run at start-up."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines, offset, blank = 0, 0, True
    with Path(path).open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = decoder.getstate()[0]  # an incomplete character carried over from the previous chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                start = offset - len(pending) + e.start
                line = newlines + chunk[: max(0, e.start - len(pending))].count(b"\n") + 1
                bad = (pending + chunk)[e.start]
                return f"line {line}: not UTF-8 text (byte {start} is 0x{bad:02x}: {e.reason}); save the file as UTF-8"
            blank = blank and not text.lstrip("\ufeff").strip()
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset += len(chunk)
    return "the file is empty" if blank else None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); bytes that are not UTF-8 are an error naming
    the line and the byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}: {e.reason}); "
                        "save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
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
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    for row in reader:
        records.append(Record(dict(row), f"{path}:line {line}"))
        line = reader.line_num + 1  # a quoted cell may span several lines
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        rows = json.loads(_read_text(path))
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
