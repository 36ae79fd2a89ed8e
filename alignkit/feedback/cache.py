"""A persistent on-disk cache of judge answers, so an interrupted labelling job resumes without asking again.

One row per *shown* comparison: key = sha256 of (judge id, template, principle, prompt, first response, second
response), the order being part of the key (the two orders of a pair are two judge calls). The value is the
judge's P(first shown is preferred) and its rationale, if any.

sqlite3 in WAL mode: readers never block the writer, several processes may write the same file (each write is
one short ``BEGIN IMMEDIATE`` transaction, waiting up to ``timeout`` seconds for the lock), and a process killed
mid-write leaves the last committed state intact.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, p_first REAL NOT NULL, rationale TEXT NOT NULL)"


def cache_key(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (strings, message lists, numbers): stable across processes and runs."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


class JudgeCache:
    """``get_many(keys) -> {key: (p_first, rationale)}`` for the keys present; ``put_many({key: (p, r)})``."""

    def __init__(self, path: str | Path, timeout: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we open one explicitly per write
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        # switching a new file to WAL can report "database is locked" at once, without waiting on the busy
        # timeout, while another process is doing the same: retry it until the timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
                self._db.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_many(self, keys: list[str]) -> dict[str, tuple[float, str]]:
        found: dict[str, tuple[float, str]] = {}
        for start in range(0, len(keys), 500):  # stay under sqlite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, p, rationale in self._db.execute(
                f"SELECT key, p_first, rationale FROM judgments WHERE key IN ({marks})", chunk
            ):
                found[key] = (p, rationale)
        return found

    def put_many(self, values: dict[str, tuple[float, str]]) -> None:
        if not values:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO judgments (key, p_first, rationale) VALUES (?, ?, ?)",
                [(k, float(p), r) for k, (p, r) in values.items()],
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        self._db.close()
