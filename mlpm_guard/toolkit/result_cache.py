"""A small on-disk store of evaluation results (judge scores, generated answers), so a resumed run
does not redo them.

It is the answer-level sibling of the feature cache: one SQLite file, JSON values, keys that are
digests of everything the result depends on (backbone, prototypes, policy, settings, prompt).
Results are written in chunks as they are produced, so an interrupted run keeps what it did.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import cache_home
from .._sqlite import SqliteStore


def digest(*parts: Any) -> str:
    """A stable key for JSON-serialisable parts (dicts are key-sorted)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResultCache(SqliteStore):
    """JSON values by key in one SQLite file (default ``<cache home>/eval/results.sqlite``)."""

    table = "results"
    schema = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT)"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(path if path is not None else cache_home() / "eval" / "results.sqlite")

    def get(self, keys: Iterable[str]) -> dict[str, Any]:
        keys = list(dict.fromkeys(keys))
        return {key: json.loads(value) for key, value in self.select_keys(keys, "key, value")}

    def put(self, items: dict[str, Any]) -> None:
        self.write("INSERT OR REPLACE INTO results VALUES (?, ?)",
                   [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()])
