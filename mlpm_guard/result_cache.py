"""A small on-disk store of evaluation results (judge scores, generated answers), so a resumed run
does not redo them.

It is the answer-level sibling of the feature cache: one SQLite file, JSON values, keys that are
digests of everything the result depends on (backbone, prototypes, policy, settings, prompt).
Results are written in chunks as they are produced, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from ._io import cache_home

_SCHEMA = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT)"


def digest(*parts: Any) -> str:
    """A stable key for JSON-serialisable parts (dicts are key-sorted)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResultCache:
    """JSON values by key in one SQLite file (default ``<cache home>/eval/results.sqlite``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_home() / "eval" / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute(_SCHEMA)
            db.commit()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with closing(self._connect()) as db:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                marks = ",".join("?" * len(part))
                for key, value in db.execute(f"SELECT key, value FROM results WHERE key IN ({marks})", part):
                    found[key] = json.loads(value)
        return found

    def put(self, items: dict[str, Any]) -> None:
        rows = [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()]
        with closing(self._connect()) as db:
            db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?)", rows)
            db.commit()

    def __len__(self) -> int:
        with closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
