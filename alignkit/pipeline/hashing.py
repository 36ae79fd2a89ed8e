"""Content hashes that decide whether a stage must run again.

hash(stage) = sha256 of its command, its options as written (references kept as ``${stages.X.Y}`` text), the
hashes of the earlier stages it reads, and the content of every local file or directory an option names. So a
stage re-runs when its own options, an upstream stage, or an input file changed, and only then.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_FILE_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file read once


def file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_CACHE[key] = digest.hexdigest()
    return _FILE_CACHE[key]


def path_hash(path: Path) -> str:
    """sha256 over a file's bytes, or over a directory's files (relative name + content hash), in sorted order."""
    if path.is_file():
        return file_hash(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            digest.update(f"{full.relative_to(path)}\0{file_hash(full)}\n".encode())
    return digest.hexdigest()


def stage_hash(command: str, options: dict[str, Any], upstream: dict[str, str]) -> str:
    """``options``: as written (references unresolved); ``upstream``: name -> hash of each stage it reads."""
    inputs = {}
    for key, value in sorted(options.items()):
        if isinstance(value, str) and "${" not in value and value and os.path.exists(value):
            inputs[key] = path_hash(Path(value))
    blob = json.dumps({"command": command, "options": options, "inputs": inputs, "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
