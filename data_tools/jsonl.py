"""JSON Lines files written atomically: a reader sees the old file or the whole new one, never half."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def write_jsonl(rows: Iterable[Mapping[str, object]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8, non-ASCII kept) to a temporary file beside `path`, then rename
    it into place; creates the parent directories. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden, and one per process
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
